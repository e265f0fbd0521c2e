"""Batch-1 decode on an engine thread, by which thread loaded the model (the server's layout).

The server runs the engine on a thread of its own while the main thread serves HTTP. Each case
runs in a fresh process (OpenMP state is per process), all in the same run:
- main: load and decode on the main thread (what `LLM.generate` does; the reference);
- loaded on main: load on the main thread, decode on a second thread (the server before);
- loaded on a short-lived thread: load on a thread that exits, decode on another (the server now,
  `server.api.off_main_thread`).

    python bench/bench_engine_thread.py [--tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

CASES = ("main", "loaded on main", "loaded on a short-lived thread")


def decode_tok_s(llm, tokens: int, repeats: int) -> float:
    from elasticserve import SamplingParams

    ids = llm.tokenizer("It is a truth universally acknowledged, that a single man")["input_ids"]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate([ids], params)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        llm.generate([ids], params)
        best = min(best, time.perf_counter() - t)
    return tokens / best


def run_case(case: str, tokens: int, repeats: int) -> float:
    """One case in this process; returns decode tokens/s."""
    from elasticserve import LLM

    result: dict[str, object] = {}

    def load() -> None:
        result["llm"] = LLM(None, None, dtype="auto")

    def decode() -> None:
        result["tok_s"] = decode_tok_s(result["llm"], tokens, repeats)

    if case == "main":
        load()
        decode()
    else:
        if case == "loaded on main":
            load()
        else:
            loader = threading.Thread(target=load)
            loader.start()
            loader.join()
        engine = threading.Thread(target=decode)
        engine.start()
        engine.join()
    return float(result["tok_s"])  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--out", default="bench/results/bench_engine_thread.json")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.tokens, args.repeats)))
        return
    results = {}
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--tokens", str(args.tokens)]
        cmd += ["--repeats", str(args.repeats)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[case] = round(float(out.strip().splitlines()[-1]), 2)
    reference = results["main"]
    for case, tok_s in results.items():
        print(f"{case:<32} {tok_s:6.1f} tok/s  x{tok_s / reference:.2f} of main")
    Path(args.out).write_text(json.dumps({"args": vars(args), "tok_s": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
