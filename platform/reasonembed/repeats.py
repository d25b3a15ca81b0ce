"""One rule for rows that arrive more than once under the same id (encode parts and LLM stage parts alike).

Ray Data re-executes a task whose worker died (``max_retries``), and a streaming consumer may then see some of its
rows twice. Such a *repeat* carries the same id and the same input, so it is a retry, not an input error: the first
copy is kept and the rest are dropped silently (counted in the log). Two rows with the same id but *different*
input (the same document id given two texts) are a *conflict*: the id cannot name both, so every row of that id
becomes an error row with reason :data:`CONFLICTING_ID`, and no output silently picks one of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

CONFLICTING_ID = "conflicting duplicate id"


def content_key(*parts: object) -> str:
    """A short stable digest of a row's input (the text, or the input columns), used to tell a retry from a conflict."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:32]


def split_repeats(ids: Sequence[str], keys: Sequence[str]) -> tuple[list[int], list[int], list[int]]:
    """``(keep, repeats, conflicts)``: row indices to keep (first row of each id whose rows all share one content key),
    indices of identical repeats to drop, and indices of every row of an id seen with two or more content keys."""
    if len(ids) != len(keys):
        raise ValueError(f"{len(ids)} ids but {len(keys)} content keys")
    by_id: dict[str, list[int]] = {}
    for i, row_id in enumerate(ids):
        by_id.setdefault(row_id, []).append(i)
    keep, repeats, conflicts = [], [], []
    for idx in by_id.values():
        if len({keys[i] for i in idx}) > 1:
            conflicts.extend(idx)
        else:
            keep.append(idx[0])
            repeats.extend(idx[1:])
    return sorted(keep), sorted(repeats), sorted(conflicts)
