"""Native CPU kernels (C++, AVX2 + FMA, OpenMP), built on first use by the machine's compiler.

`load()` returns the extension module, or None with one warning where it cannot be had (no
compiler, a CPU without AVX2/FMA, a failed build): callers then keep the torch path.
"""

from .build import load, native_available

__all__ = ["load", "native_available"]
