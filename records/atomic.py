"""Atomic writes for the study folder: diffusion_core's one implementation (it imports nothing
of ours, so it owns it) plus the JSON form the records use."""
from __future__ import annotations

import json
import os

from diffusion_core.atomic import TEMP_SUFFIX, atomic_write, write_bytes, write_text

__all__ = ["TEMP_SUFFIX", "atomic_write", "write_bytes", "write_json", "write_text"]


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, default=str))
