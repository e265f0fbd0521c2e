"""What a shrunk shape sounds like: five fixed chat prompts answered by the full shape and by the
shapes the `slo` policy served under overload.

The shapes are given (`--shapes`) or read from a benchmark's result, each with its share of
the served tokens (shapes under `--min-share` left out): the shapes elasticserve's `slo` server
answered with in a `bench/peers.py compare` overload run (`--from-peers`), or in a
`bench/compare_policies.py` run at `--load` times the full shape's capacity (`--from-policies`).
Greedy, the pack's adapters bound, the chat template; writes chat_samples.md and .json to
`--out`.

    python bench/chat_samples.py \
        --from-policies bench/results/compare_policies/compare_policies.json
    python bench/chat_samples.py --from-peers bench/results/peers.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from elasticserve import LLM, SamplingParams
from elasticserve.model.device import cpu_model
from elasticserve.training.chat import chat_ids

PROMPTS = [
    "What is the capital of France, and what is it famous for?",
    "Write a short, friendly email inviting a colleague to lunch on Friday.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for sleeping better.",
    "What is 12 times 7? Explain how you worked it out.",
]


def main_shapes(mix: dict[str, float], min_share: float) -> dict[str, float]:
    """The shapes of a served mix with at least `min_share`, largest share first."""
    return {
        s: share for s, share in sorted(mix.items(), key=lambda kv: -kv[1]) if share >= min_share
    }


def served_shapes(path: Path, min_share: float) -> dict[str, float]:
    """Shape -> share of the `slo` server's overload requests, from a peers.json."""
    rows = {r["server"]: r for r in json.loads(path.read_text())["rows"]}
    mix = (rows.get("elasticserve-slo", {}).get("overload") or {}).get("shape_mix") or {}
    if not mix:
        raise SystemExit(f"{path}: no overload shape mix of elasticserve-slo")
    return main_shapes(mix, min_share)


def policy_shapes(path: Path, load: float, min_share: float) -> dict[str, float]:
    """Shape -> share of the `slo` policy's tokens at `load` x capacity, from compare_policies."""
    data = json.loads(path.read_text())
    capacity = float(data["meta"]["slo_capacity_rps"])
    runs = data["results"].get("slo") or []
    if not runs:
        raise SystemExit(f"{path}: no slo runs")
    run = min(runs, key=lambda r: abs(float(r["request_rate"]) / capacity - load))
    return main_shapes(run["shape_mix"], min_share)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=None, help="e.g. d24-w0.75,d30-w0.5-q4")
    parser.add_argument("--from-peers", default=None, help="a peers.json with an overload run")
    parser.add_argument("--from-policies", default=None, help="a compare_policies.json")
    parser.add_argument("--load", type=float, default=2.0, help="x capacity (--from-policies)")
    parser.add_argument("--min-share", type=float, default=0.05)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    shares: dict[str, float | None] = {}
    if args.from_peers:
        shares.update(served_shapes(Path(args.from_peers), args.min_share))
    if args.from_policies:
        shares.update(policy_shapes(Path(args.from_policies), args.load, args.min_share))
    for shape in (args.shapes or "").split(","):
        if shape:
            shares.setdefault(shape, None)
    llm = LLM()
    names = ["full"] + [
        s for s in shares if llm.bundle.spec(s).name != llm.bundle.spec("full").name
    ]
    prompts = [chat_ids(llm.tokenizer, p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    answers = {}
    for name in names:
        outs = llm.generate(prompts, params, shape=name)
        answers[llm.bundle.spec(name).name] = [o.outputs[0].text.strip() for o in outs]
    quality = {s.name: s.ppl for s in llm.shapes}
    agree = {s.name: (s.chat or {}).get("agree") for s in llm.shapes}
    lines = [
        f"Machine: {cpu_model()}; greedy, {args.max_tokens} tokens at most, the pack's adapters.",
        "",
    ]
    for i, prompt in enumerate(PROMPTS):
        lines += [f"**{prompt}**", ""]
        lines.append("| shape | share under overload | ppl | chat agreement | answer |")
        lines.append("|---|---|---|---|---|")
        for name, texts in answers.items():
            share = next((v for k, v in shares.items() if llm.bundle.spec(k).name == name), None)
            ppl, agreed = quality.get(name), agree.get(name)
            text = texts[i].replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| {name} | {'-' if share is None else f'{share:.0%}'} | "
                f"{'-' if ppl is None else f'{ppl:.1f}'} | "
                f"{'-' if agreed is None else f'{agreed:.0%}'} | {text} |"
            )
        lines.append("")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chat_samples.md").write_text("\n".join(lines))
    payload = {"prompts": PROMPTS, "shares": shares, "answers": answers, "args": vars(args)}
    (out / "chat_samples.json").write_text(json.dumps(payload, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
