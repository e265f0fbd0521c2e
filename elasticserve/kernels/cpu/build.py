"""Builds the native CPU extension with torch.utils.cpp_extension, once per source version."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path
from types import ModuleType

SOURCES = (
    "linear.cpp",
    "amx.cpp",
    "qlinear.cpp",
    "qamx.cpp",
    "onednn.cpp",
    "ops.cpp",
    "forward.cpp",
    "bindings.cpp",
)
HEADERS = ("linear.h", "qlinear.h", "ops.h", "forward.h", "simd.h")
CSRC = Path(__file__).parent / "csrc"
FLAGS = ("-O3", "-fopenmp", "-fno-math-errno")

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def _version() -> str:
    """A hash of the sources, flags and torch version: a change builds a new extension."""
    import torch

    digest = hashlib.sha256(torch.__version__.encode())
    for name in SOURCES + HEADERS:
        digest.update((CSRC / name).read_bytes())
    digest.update(" ".join(FLAGS).encode())
    return digest.hexdigest()[:12]


def build_dir() -> Path:
    """Where the extension is built: the user's cache, keyed by source version."""
    from ...paths import cache_root

    return cache_root() / "native" / _version()


def load() -> ModuleType | None:
    """The extension (built now if needed, ~40 s the first time), or None with one warning."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        _state["module"] = module = _build()
        return module


def native_available() -> bool:
    """True when the native kernels load on this machine."""
    return load() is not None


def _build() -> ModuleType | None:
    try:
        from torch.utils import cpp_extension

        where = build_dir()
        where.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        module = cpp_extension.load(
            name="elasticserve_cpu",
            sources=[str(CSRC / s) for s in SOURCES],
            extra_cflags=list(FLAGS),
            extra_ldflags=["-fopenmp"],
            build_directory=str(where),
            verbose=False,
        )
        took = time.perf_counter() - start
        if took > 2:
            log.info("built the native CPU kernels in %.0f s (%s)", took, where)
        if not module.cpu_supported():
            log.warning("native CPU kernels off: this CPU lacks AVX2/FMA/F16C; torch ops serve")
            return None
        return module
    except Exception as exc:  # no compiler, no ninja, not x86, a failed build: torch ops serve
        name = type(exc).__name__
        log.warning("native CPU kernels unavailable (%s: %s); torch ops serve", name, exc)
        return None
