"""Multi-turn chat TTFT with prefix caching on vs off, same model, same run, interleaved.

8 conversations of 6 turns; each turn appends ~100 tokens of held-out text (persuasion.txt) and
the previous answer to the history; the 8 conversations' turn k arrive together, or each
conversation sends its next turn when its answer ends (`--arrivals closed`). Each round
runs every turn once with caching on and once off (at each `--budgets` step token budget),
the order reversed every other round. Prints the median TTFT of turns >= 2 per configuration,
the on/off ratio per budget, and total throughput; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from elasticserve.engine.llm_engine import EngineConfig, LLMEngine
from elasticserve.engine.sampling import SamplingParams
from elasticserve.model.bundle import load_bundle
from elasticserve.model.device import cpu_model, kernel_flags

CORPUS = Path(__file__).resolve().parents[2] / "shared/corpus/austen/persuasion.txt"


def conversation_pieces(tokenizer, conversations: int, turns: int, size: int) -> list[list[str]]:
    """Per conversation, per turn, a user message of about `size` tokens of held-out text."""
    words = CORPUS.read_text().split()
    pieces, pos = [], 5000
    for _ in range(conversations):
        convo = []
        for _ in range(turns):
            chunk = words[pos : pos + int(size * 0.75)]
            pos += len(chunk)
            convo.append(" ".join(chunk))
        pieces.append(convo)
    return pieces


def run_round(engine: LLMEngine, pieces: list[list[str]], max_tokens: int, closed: bool) -> dict:
    """Every conversation's turns; TTFT of every request by turn and the round's tokens/s.

    together: turn k of every conversation arrives once turn k-1 of all of them has ended.
    closed: each conversation is its own client that sends its next turn as soon as its answer
    ends (vLLM's multi-turn benchmark, no think time); they start together.
    """
    tok = engine.tokenizer
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    histories: list[list[dict[str, str]]] = [[] for _ in pieces]
    turns = [0] * len(pieces)  # the turn each conversation sends next
    ttft: dict[int, list[float]] = {}
    pending: dict[str, tuple[int, int, float]] = {}  # request id -> (conversation, turn, sent)
    tokens, start = 0, time.perf_counter()

    def send(c: int) -> None:
        nonlocal tokens
        histories[c].append({"role": "user", "content": pieces[c][turns[c]]})
        text = tok.apply_chat_template(histories[c], tokenize=False, add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        pending[engine.add_request(prompt, params)] = (c, turns[c], time.perf_counter())
        turns[c] += 1
        tokens += len(prompt)

    while pending or min(turns) < len(pieces[0]):
        if not pending:  # the start, and in `together` every turn's start
            for c in range(len(pieces)):
                send(c)
        for out in engine.step():
            c, turn, sent = pending[out.request_id]
            if out.outputs[0].num_tokens == 1:
                ttft.setdefault(turn, []).append(time.perf_counter() - sent)
            if not out.finished:
                continue
            histories[c].append({"role": "assistant", "content": out.outputs[0].text})
            tokens += out.outputs[0].num_tokens
            del pending[out.request_id]
            if closed and turns[c] < len(pieces[c]):
                send(c)
    return {"ttft": ttft, "tokens_per_s": tokens / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--turn-tokens", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--arrivals",
        choices=("together", "closed"),
        default="together",
        help="together: turn k of all conversations at once; closed: each conversation sends "
        "its next turn when its answer ends",
    )
    parser.add_argument(
        "--budgets",
        default="512",
        help="comma-separated step token budgets (max_num_batched_tokens) to run, each with "
        "caching on and off, all interleaved",
    )
    parser.add_argument("--out", default="bench/results/prefix_cache.json")
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    bundle = load_bundle()
    configs = [(mode, b) for b in budgets for mode in ("on", "off")]
    engines = {
        (mode, b): LLMEngine(
            bundle, EngineConfig(enable_prefix_caching=mode == "on", max_num_batched_tokens=b)
        )
        for mode, b in configs
    }
    pieces = conversation_pieces(bundle.tokenizer, args.conversations, args.turns, args.turn_tokens)
    later: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    first: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    rate: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for mode, b in configs if r % 2 == 0 else configs[::-1]:
            engine = engines[mode, b]
            engine.block_manager.reset_cache()  # every round starts cold
            result = run_round(engine, pieces, args.max_tokens, args.arrivals == "closed")
            first[mode, b] += result["ttft"][0]
            later[mode, b] += [t for turn, ts in result["ttft"].items() if turn > 0 for t in ts]
            rate[mode, b].append(result["tokens_per_s"])
            print(f"round {r} budget {b} caching {mode}: {result['tokens_per_s']:.0f} tok/s")
    rows = {
        c: {
            "ttft_turn1_median_s": statistics.median(first[c]),
            "ttft_later_median_s": statistics.median(later[c]),
            "tokens_per_s": statistics.median(rate[c]),
            "hit_rate": engines[c].stats().prefix_cache_hits
            / max(1, engines[c].stats().prefix_cache_queries),
        }
        for c in configs
    }
    print(f"CPU: {cpu_model()}, flags: {' '.join(kernel_flags())}; {args.rounds} rounds")
    print(f"{args.conversations} conversations x {args.turns} turns, arrivals {args.arrivals}")
    print(
        f"{'budget':>6} {'caching':8} {'TTFT turn 1':>12} {'TTFT turns 2+':>14} {'tok/s':>8} "
        f"{'hit rate':>9}"
    )
    for (mode, b), row in rows.items():
        print(
            f"{b:6} {mode:8} {row['ttft_turn1_median_s'] * 1e3:10.0f}ms "
            f"{row['ttft_later_median_s'] * 1e3:12.0f}ms {row['tokens_per_s']:8.0f} "
            f"{row['hit_rate']:9.2f}"
        )
    summary = {}
    for b in budgets:
        on, off = rows["on", b], rows["off", b]
        ratio = off["ttft_later_median_s"] / on["ttft_later_median_s"]
        throughput = on["tokens_per_s"] / off["tokens_per_s"]
        print(
            f"budget {b}: turns 2+ median TTFT off/on {ratio:.2f}x; throughput on/off "
            f"{throughput:.2f}x"
        )
        summary[str(b)] = {
            "modes": {"on": on, "off": off},
            "ttft_ratio": ratio,
            "throughput_ratio": throughput,
        }
    base = budgets[0]
    for b in budgets[1:]:
        for mode in ("on", "off"):
            t = rows[mode, b]["ttft_later_median_s"] / rows[mode, base]["ttft_later_median_s"]
            x = rows[mode, b]["tokens_per_s"] / rows[mode, base]["tokens_per_s"]
            print(f"caching {mode}: budget {b} vs {base}: TTFT turns 2+ {t:.2f}x, tok/s {x:.2f}x")
    result = {
        "args": vars(args),
        "cpu": cpu_model(),
        "cpu_flags": kernel_flags(),
        "budgets": summary,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
