"""Multi-turn chat TTFT with prefix caching on vs off, same model, same run, interleaved.

8 conversations of 6 turns; each turn appends ~100 tokens of held-out text (persuasion.txt) and
the previous answer to the history; the 8 conversations' turn k arrive together, or each
conversation sends its next turn when its answer ends (`--arrivals closed`). Each round
runs every turn once with caching on and once off, alternating which goes first. Prints the
median TTFT of turns >= 2 per mode and their ratio, and total throughput; writes JSON.
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
    parser.add_argument("--out", default="bench/results/prefix_cache.json")
    args = parser.parse_args()
    bundle = load_bundle()
    engines = {
        "on": LLMEngine(bundle, EngineConfig(enable_prefix_caching=True)),
        "off": LLMEngine(bundle, EngineConfig(enable_prefix_caching=False)),
    }
    pieces = conversation_pieces(bundle.tokenizer, args.conversations, args.turns, args.turn_tokens)
    later: dict[str, list[float]] = {"on": [], "off": []}
    first: dict[str, list[float]] = {"on": [], "off": []}
    rate: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(args.rounds):
        for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
            engine = engines[mode]
            engine.block_manager.reset_cache()  # every round starts cold
            result = run_round(engine, pieces, args.max_tokens, args.arrivals == "closed")
            first[mode] += result["ttft"][0]
            later[mode] += [t for turn, ts in result["ttft"].items() if turn > 0 for t in ts]
            rate[mode].append(result["tokens_per_s"])
            print(f"round {r} caching {mode}: {result['tokens_per_s']:.0f} tok/s", flush=True)
    rows = {
        mode: {
            "ttft_turn1_median_s": statistics.median(first[mode]),
            "ttft_later_median_s": statistics.median(later[mode]),
            "tokens_per_s": statistics.median(rate[mode]),
            "hit_rate": engines[mode].stats().prefix_cache_hits
            / max(1, engines[mode].stats().prefix_cache_queries),
        }
        for mode in ("on", "off")
    }
    print(f"CPU: {cpu_model()}, flags: {' '.join(kernel_flags())}; {args.rounds} rounds")
    print(f"{args.conversations} conversations x {args.turns} turns, arrivals {args.arrivals}")
    print(f"{'caching':8} {'TTFT turn 1':>12} {'TTFT turns 2+':>14} {'tok/s':>8} {'hit rate':>9}")
    for mode, row in rows.items():
        print(
            f"{mode:8} {row['ttft_turn1_median_s'] * 1e3:10.0f}ms "
            f"{row['ttft_later_median_s'] * 1e3:12.0f}ms {row['tokens_per_s']:8.0f} "
            f"{row['hit_rate']:9.2f}"
        )
    ratio = rows["off"]["ttft_later_median_s"] / rows["on"]["ttft_later_median_s"]
    throughput = rows["on"]["tokens_per_s"] / rows["off"]["tokens_per_s"]
    print(f"turns 2+ median TTFT off/on: {ratio:.2f}x; throughput on/off: {throughput:.2f}x")
    result = {
        "args": vars(args),
        "cpu": cpu_model(),
        "cpu_flags": kernel_flags(),
        "modes": rows,
        "ttft_ratio": ratio,
        "throughput_ratio": throughput,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
