"""Where elasticserve keeps what it caches: converted models, native builds, latency profiles."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$ELASTICSERVE_CACHE` if set, else the user cache dir (~/.cache/elasticserve)."""
    import platformdirs

    env = os.environ.get("ELASTICSERVE_CACHE")
    return Path(env) if env else Path(platformdirs.user_cache_dir("elasticserve"))
