"""Atomic file writes: nothing half-written is left behind when a run is interrupted.

Every file romelens writes (caches, traces, figures, saved edits, benchmark records) goes
through a temporary file in the target folder and an `os.replace`, which is atomic on POSIX
and Windows. The file gets the usual permissions (0666 minus the umask), not the 0600 of a
temporary file.

Example:
    >>> from tracer.files import atomic_path, atomic_write_text
    >>> atomic_write_text("out/summary.json", "{}")
    >>> with atomic_path("out/C.safetensors") as tmp:
    ...     save_file(tensors, tmp)
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once, once per process
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_read_umask()  # what open() would give a new file


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path`; renamed to `path` when the block succeeds, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _MODE)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def safe_name(text: str, sep: str = "-") -> str:
    """`text` as a file-name part: every run of characters other than `A-Za-z0-9._-` becomes `sep`.

    Example:
        >>> safe_name("google/gemma-3-270m")
        'google-gemma-3-270m'
    """
    return re.sub(r"[^A-Za-z0-9._-]+", sep, text)
