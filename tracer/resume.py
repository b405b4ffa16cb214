"""Resumable runs: one JSON line per finished item, and the one rule for reading them back.

A long run (a benchmark over records, a sweep) appends one JSON object per finished item
to a `.jsonl` file (`append_jsonl`: written whole, flushed and fsynced), so a run that is
killed loses at most the item it was writing. Rerun with the same folder, it reads the file
back with `read_jsonl` and skips the items already there. The rule, in full:

1. A missing file holds no rows.
2. Every line is one JSON object that ends with a newline. A last line without its newline,
   or one that does not parse with only blank lines after it, was cut off by a kill: it is
   dropped with a warning (and cut from the file with `repair=True`, so the next append
   starts on a fresh line), and its item is redone.
3. A line that does not parse with rows after it means the file is corrupt, not torn:
   `ValueError`, naming the line. Nothing is guessed or skipped.
4. Rows are keyed by the item's id (`key`). A later line for an id already read replaces
   the earlier one (the last write wins) and keeps the earlier one's place, so an item is
   never counted twice. A row without the id is a `ValueError`.

Example:
    >>> from tracer.resume import append_jsonl, read_jsonl
    >>> append_jsonl("run/records.jsonl", {"case_id": 7, "es": 1.0})
    >>> done = read_jsonl("run/records.jsonl", key="case_id", repair=True)   # {7: {...}}
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Hashable

log = logging.getLogger(__name__)


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append `row` as one JSON line to `path` (its folder made if needed), flushed and fsynced.

    Args:
        path: the `.jsonl` file; created if missing.
        row: a JSON-serialisable dict (one finished item).

    Raises:
        TypeError: `row` holds a value `json.dumps` cannot serialise (nothing is written).
        OSError: the file cannot be written.

    Example:
        >>> append_jsonl("run/records.jsonl", {"case_id": 7, "es": 1.0})
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(
    path: str | os.PathLike, *, key: str | Callable[[dict], Hashable], repair: bool = False
) -> dict[Hashable, dict]:
    """The rows of a JSON-lines file, keyed by item id, under the rule in this module's docstring.

    Args:
        path: the `.jsonl` file.
        key: the field holding each row's id (e.g. `"case_id"`), or a function of the row.
        repair: cut a torn last line from the file (do this before appending to it).

    Returns:
        `{id: row}` in the order the ids first appear; for an id written twice, its last row.

    Raises:
        ValueError: a line that is not valid JSON with rows after it (a corrupt file), or a
            row without its id.

    Example:
        >>> read_jsonl(out / "traces.jsonl", key=lambda row: str(row["known_id"]), repair=True)
    """
    path = Path(path)
    if not path.exists():
        return {}
    get = key if callable(key) else (lambda row: row[key])
    data = path.read_bytes()
    rows: dict[Hashable, dict] = {}
    good_end, pos = 0, 0
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        end = pos + len(line) + (1 if i < len(lines) - 1 else 0)  # byte offset after this line
        pos = end
        if not line.strip():
            good_end = end
            continue
        try:
            row = json.loads(line)
            if i == len(lines) - 1:  # no newline after it: the write was cut after the JSON
                raise ValueError("unterminated line")
        except ValueError:
            if any(ln.strip() for ln in lines[i + 1 :]):
                raise ValueError(f"results {str(path)!r}: line {i + 1} is not valid JSON") from None
            log.warning("%s: dropping a truncated last line (%d bytes); it will be redone", path, len(line))
            break
        try:
            rid = get(row)
        except (KeyError, TypeError):
            what = f"id field {key!r}" if isinstance(key, str) else "id"
            raise ValueError(f"results {str(path)!r}: line {i + 1} has no {what}") from None
        if rid in rows:
            log.warning("%s: line %d repeats id %r; the later row replaces the earlier", path, i + 1, rid)
        rows[rid] = row
        good_end = end
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return rows
