"""Where derived data is cached (classifier reference statistics, fitted MoLRG mixtures): one folder
for the data and the metrics alike, so neither imports the other for it."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "STUDYCTL_CACHE_DIR"


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The caller's folder, else $STUDYCTL_CACHE_DIR, else ~/.cache/studyctl."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "studyctl"
