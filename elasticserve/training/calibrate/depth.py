"""Layer tables: which layers each depth keeps, by AmoebaLLM's dynamic programming, plus baselines.

Every candidate is scored by the KL divergence of its next-token distribution from the full
model's on a small calibration batch. The DP walks from the last layer backwards, so the layers
before the one it decides on are all kept: their inputs are the full model's, computed once and
cached, and scoring a candidate only runs the layers after it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel

LayerTables = dict[int, tuple[int, ...]]
Cell = list[tuple[float, tuple[int, ...]]]  # a DP cell's candidates: (KL, kept layers), best first


class LayerRunner:
    """Runs any subset of a transformers decoder's layers on cached hidden states."""

    def __init__(self, hf: PreTrainedModel, ids: torch.Tensor, scored: int | None = None):
        # ids [N, T]; the KL is taken over the last `scored` positions of each window
        self.hf, self.ids = hf, ids
        self.layers = list(hf.model.layers)
        positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        with torch.inference_mode():
            embeds = hf.model.embed_tokens(ids)  # [N, T, H]
            self.rope = hf.model.rotary_emb(embeds, positions)
            self.inputs = self.run(embeds, range(len(self.layers)), keep=True)
            self.scored = slice(-(scored or ids.shape[1]), None)
            self.ref = self.log_probs(self.inputs[-1])  # [N, S, V] full model

    @torch.inference_mode()
    def run(
        self, h: torch.Tensor, layers: range | list[int], keep: bool = False
    ) -> list[torch.Tensor]:
        """Hidden states after each of `layers` ([h] + outputs if keep, else [output])."""
        out = [h]
        for i in layers:
            h = self.layers[i](h, position_embeddings=self.rope)
            if keep:
                out.append(h)
        return out if keep else [h]

    @torch.inference_mode()
    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities of the scored positions: [N, S, V]."""
        h = self.hf.model.norm(h[:, self.scored])
        return F.log_softmax(self.hf.lm_head(h).float(), dim=-1)

    @torch.inference_mode()
    def kl(self, h: torch.Tensor) -> float:
        """Mean KL(full || candidate) per scored token."""
        logp = self.log_probs(h)
        return (self.ref.exp() * (self.ref - logp)).sum(-1).mean().item()

    def score(self, kept: Sequence[int], start: int, h: torch.Tensor | None = None) -> float:
        """KL of the network keeping `kept`, identical to the full one before layer `start`.

        `h`, if given, is the hidden state entering layer `start` in that network.
        """
        h = self.inputs[start] if h is None else h
        return self.kl(self.run(h, [i for i in kept if i >= start])[0])

    def inputs_of(self, kept: Sequence[int]) -> dict[int, torch.Tensor]:
        """The hidden state entering each layer of the network keeping `kept`."""
        states = self.run(self.inputs[0], list(kept), keep=True)
        return dict(zip(kept, states, strict=False))


def dp_tables(
    runner: LayerRunner, depths: list[int], beam: int = 1, progress: bool = True
) -> LayerTables:
    """AmoebaLLM's DP, widened to a beam: cell (n, m) removes m of the last n prunable layers.

    Each cell keeps its `beam` best candidates (beam 1 is the paper's DP). A cell's candidates
    either keep the layer decided now (the previous cell's, same score: every layer before is
    kept, so where a candidate is scored from does not change its KL) or remove it from one of
    the previous cell's candidates with one fewer removal. The final layer is always kept.
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    num = len(runner.layers)
    prunable = num - 1
    most = num - min(depths)
    cells: list[Cell] = [[(0.0, tuple(range(num)))]] + [[] for _ in range(most)]
    bar = tqdm(
        total=sum(min(n, most) for n in range(1, prunable + 1)),
        desc=f"depth DP (beam {beam})",
        disable=not progress,
    )
    for n in range(1, prunable + 1):
        layer = prunable - n  # decided now; every layer before it is kept
        nxt: list[Cell] = [cells[0]]
        for m in range(1, most + 1):
            if m > n:
                nxt.append([])
                continue
            removed = [tuple(i for i in kept if i != layer) for _, kept in cells[m - 1]]
            scored = [(runner.score(list(c), layer), c) for c in removed]
            nxt.append(sorted(cells[m] + scored)[:beam])
            bar.update()
        cells = nxt
    bar.close()
    return {d: cells[num - d][0][1] for d in depths}


def block_influence_tables(runner: LayerRunner, depths: list[int]) -> LayerTables:
    """Baseline (ShortGPT): drop the layers whose output is most like their input (1 - cos)."""
    num = len(runner.layers)
    influence = [
        1 - F.cosine_similarity(runner.inputs[i], runner.inputs[i + 1], dim=-1).mean().item()
        for i in range(num - 1)
    ]
    ranked = sorted(range(num - 1), key=lambda i: influence[i], reverse=True)
    return {d: (*sorted(ranked[: d - 1]), num - 1) for d in depths}


def greedy_tables(runner: LayerRunner, depths: list[int], progress: bool = True) -> LayerTables:
    """Baseline: remove one layer at a time, each time the one whose removal costs least KL."""
    num = len(runner.layers)
    kept = tuple(range(num))
    tables: LayerTables = {num: kept} if num in depths else {}
    for _ in tqdm(range(num - min(depths)), desc="greedy depth", disable=not progress):
        kept = best_removal(runner, kept)[1]
        if len(kept) in depths:
            tables[len(kept)] = kept
    return tables


def best_removal(runner: LayerRunner, kept: tuple[int, ...]) -> tuple[float, tuple[int, ...]]:
    """The cheapest set with one layer of `kept` removed (never the last), and its KL."""
    inputs = runner.inputs_of(kept)
    return min(
        (runner.score(cand, layer, inputs[layer]), cand)
        for layer in kept[:-1]
        for cand in [tuple(i for i in kept if i != layer)]
    )


def best_addition(runner: LayerRunner, kept: tuple[int, ...]) -> tuple[float, tuple[int, ...]]:
    """The best set with one removed layer put back into `kept`, and its KL."""
    inputs = runner.inputs_of(kept)
    # a layer put back sees what the next kept layer would have: everything before it ran
    return min(
        (runner.score(cand, layer, inputs[min(i for i in kept if i > layer)]), cand)
        for layer in range(len(runner.layers))
        if layer not in kept
        for cand in [tuple(sorted((*kept, layer)))]
    )


def refine_tables(
    runner: LayerRunner, tables: LayerTables, rounds: int = 3, progress: bool = True
) -> LayerTables:
    """Floating search seeded by the DP: lower each depth's KL where local moves can.

    Depths go from the largest down. A depth starts from the best of its DP table, the greedy
    baseline's set and greedy removals from the next larger depth's refined set (the DP scores
    an early layer with every layer before it intact; a descent sees it in the pruned network).
    Then up to `rounds` exchanges: put back the removed layer that helps most, remove the layer
    that costs least from the result, keep the new set only if its KL is lower. So on the
    calibration batch no depth is worse than the DP or greedy removal.
    """
    num = len(runner.layers)
    removal = functools.cache(functools.partial(best_removal, runner))  # chains share steps

    def descend(kept: tuple[int, ...], depth: int) -> tuple[float, tuple[int, ...]]:
        step = removal(kept)  # callers pass a larger set
        while len(step[1]) > depth:
            step = removal(step[1])
        return step

    refined: LayerTables = {}
    above = greedy = tuple(range(num))
    for depth in tqdm(sorted(tables, reverse=True), desc="depth refine", disable=not progress):
        best = (runner.score(tables[depth], 0), tables[depth])
        if depth < num:
            by_greedy = descend(greedy, depth)
            best = min(best, by_greedy, descend(above, depth))
            greedy = by_greedy[1]
            for _ in range(rounds):
                swapped = removal(best_addition(runner, best[1])[1])
                if swapped[0] >= best[0]:
                    break
                best = swapped
        refined[depth] = above = best[1]
    return refined
