"""Atomic file replacement: a reader sees the old file or the new one, never a torn one.

`atomic_write(path)` yields a binary file opened on a temporary name in the target's own
folder (a rename is atomic only within one file system). On a clean exit the bytes are
flushed and fsynced, the temp file is renamed over the target (`os.replace`, atomic on
POSIX) and the folder is fsynced so the rename itself survives a power cut. If the writer
raises, the temp file is removed and the target keeps its old content.

The temp name starts with a dot (`.<name>.<pid>-<random>.tmp`): pyarrow and the study
readers skip dot-files, so a half-written Parquet part is never read. It is created with
the process umask (mkstemp would make it 0600: files others must read, such as the shipped
classifier weights or a shared study folder, would become private).

The one implementation for the whole project: `records.atomic` re-exports it for the layers
above (diffusion_core imports nothing of theirs).
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import IO, Iterator

TEMP_SUFFIX = ".tmp"


def temp_name(path: Path) -> Path:
    """A fresh temp path beside `path` (dot-named, unique per process and call)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """with atomic_write(p) as fh: fh.write(...) -> p holds exactly the new bytes, or (on an
    exception inside the block) is unchanged. Creates p's folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())   # the bytes are durable before the rename makes them visible
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path) as fh:
        fh.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))
