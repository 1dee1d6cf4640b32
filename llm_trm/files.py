"""Small file-system helpers shared by every writer: atomic text writes, checksums, moving aside.

Nothing a user produced is ever deleted by llm-trm: what is in the way is moved aside
(`move_aside`), and files are replaced atomically (temp file, fsync, rename), so a
reader sees the old or the new content, never half of it.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

TMP_SUFFIX = ".tmp"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames inside `path` durable; some filesystems refuse fsync on directories, which is harmless."""
    try:
        fsync_file(path)
    except OSError:
        pass


def tmp_path(path: str | os.PathLike) -> Path:
    """The temp file a writer fills before renaming it onto `path`."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file, fsync, rename and fsync the directory: readers see old or new, never half."""
    path = Path(path)
    tmp = tmp_path(path)
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def aside_path(path: str | os.PathLike, label: str = "old") -> Path:
    """A free name beside `path`: `<name>.<label>-<timestamp>[-n]`."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.{label}-{stamp}")
    suffix = 1
    while target.exists():
        target = path.with_name(f"{path.name}.{label}-{stamp}-{suffix}")
        suffix += 1
    return target


def move_aside(path: str | os.PathLike, label: str = "old") -> Path:
    """Rename `path` (file or folder) to `<name>.<label>-<timestamp>[-n]` beside it and return the new path."""
    target = aside_path(path, label)
    os.rename(path, target)
    return target
