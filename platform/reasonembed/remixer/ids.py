"""Content-derived ids, seeds and shard names: what makes every ReMixer stage exactly-once.

- Ids are hashes of content, never counters: ``h(parts) = sha256("\\x1f".join(parts))[:16]`` (hex). A query id is
  ``h("query", domain, query_text)``, so the same text always gets the same id and duplicates collapse; a generation
  request id is ``h("gen", domain, doc_id, j)``, an annotation pair id ``h("pair", query_id, doc_id)``, a sample id
  ``h("sample", query_id)``.
- Random draws (length bucket, education level, padding documents) come from ``random.Random(h(seed, row id))``, so
  they depend only on the row, not on the order or the batch it was processed in.
- Shards are fixed-size chunks of the sorted source list of a domain: ``<domain>-<k:05d>``. Every later stage keeps
  the shard of the source its rows descend from, so a shard's rows are fully determined by the finished upstream
  stage, and a killed run that re-does a shard re-writes the same rows.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any


def content_hash(*parts: Any) -> str:
    """16 hex chars of sha256 over the parts joined by the unit separator (stable across processes)."""
    blob = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def row_rng(seed: int, *parts: Any) -> random.Random:
    """A ``random.Random`` seeded by the job seed and a row's identity."""
    return random.Random(int(content_hash("rng", seed, *parts), 16))


def weighted_pick(rng: random.Random, labels: list[str], weights: list[float]) -> str:
    """One label drawn with the given relative weights."""
    return rng.choices(labels, weights=weights, k=1)[0]


def shard_name(domain: str, index: int) -> str:
    return f"{domain}-{index:05d}"


def shard_domain(shard: str) -> str:
    """The domain part of a shard name (domains may contain '-', the index never does)."""
    return shard.rsplit("-", 1)[0]


def stage_hash(name: str, *sections: Any) -> str:
    """Hash of what determines a stage's rows: its own settings plus the hashes of the stages it reads."""
    payload = [s.model_dump(mode="json") if hasattr(s, "model_dump") else s for s in sections]
    blob = json.dumps({"stage": name, "sections": payload}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def row_content_hash(row: dict[str, Any]) -> str:
    """Hash of a whole output row (canonical JSON): two runs agree on a row iff these agree."""
    blob = json.dumps(row, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
