"""Corpora for the scale bench (bench/scale.py): a deterministic synthetic corpus of any size, and a ~20k-passage
real-text corpus (SciFact + ImpliRet, split into passages) with real queries for the recall measurement.

The synthetic corpus draws words from a fixed vocabulary (the English words of the tiny models' tokenizer sample,
so a WordPiece tokenizer sees mostly whole words) with log-normal lengths under a fixed seed: the same
``(n, seed)`` always gives the same files, byte for byte. It is written as sharded parquet (``id``, ``text``),
locally or to S3 (any URI ``reasonembed.storage.Location`` takes).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

ROWS_PER_FILE = 10_000  # a sharded corpus: every size is read in blocks of the same size
MEAN_WORDS = 40  # mean document length in words (log-normal, 3..300)
DONE = "_corpus.done"  # JSON, written last: its presence marks a complete corpus folder


def vocabulary() -> np.ndarray:
    """The fixed vocabulary: the distinct lower-cased words of ``reasonembed.models.tiny.SAMPLE_TEXT``, sorted."""
    from reasonembed.models.tiny import SAMPLE_TEXT

    return np.array(sorted(set(re.findall(r"[a-z]{2,}", SAMPLE_TEXT.lower()))), dtype=object)


def doc_id(i: int) -> str:
    return f"d{i:08d}"


def _texts(rng: np.random.Generator, vocab: np.ndarray, n: int) -> list[str]:
    lengths = np.clip(rng.lognormal(np.log(MEAN_WORDS) - 0.18, 0.6, n).astype(int), 3, 300)
    words = vocab[rng.integers(0, len(vocab), int(lengths.sum()))]
    ends = np.cumsum(lengths)
    return [" ".join(words[e - k:e]) for e, k in zip(ends, lengths, strict=True)]


def write_synthetic(uri: str, n: int, seed: int = 0, storage=None) -> str:
    """Write (or reuse) the ``n``-document synthetic corpus under ``uri``; returns ``uri``. File ``k`` holds
    documents ``k*ROWS_PER_FILE ...`` drawn from its own generator (seed, k), so files are independent of ``n``'s
    other files and of the write order."""
    from reasonembed.storage import Location

    loc = Location(uri, storage)
    if loc.exists(DONE) and loc.read_json(DONE) == {"n": n, "seed": seed}:
        return uri
    loc.makedirs()
    vocab = vocabulary()
    for k, start in enumerate(range(0, n, ROWS_PER_FILE)):
        m = min(ROWS_PER_FILE, n - start)
        rng = np.random.default_rng([seed, k])
        ids = [doc_id(i) for i in range(start, start + m)]
        loc.write_table(f"part-{k:05d}.parquet", pa.table({"id": ids, "text": _texts(rng, vocab, m)}))
    loc.write_json(DONE, {"n": n, "seed": seed})
    return uri


def synthetic_queries(n: int, seed: int = 1) -> list[str]:
    """``n`` short queries (4-12 words) from the same vocabulary."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary()
    return [" ".join(vocab[rng.integers(0, len(vocab), int(k))]) for k in rng.integers(4, 13, n)]


def _passages(text: str, words: int = 80) -> list[str]:
    toks = text.split()
    return [" ".join(toks[i:i + words]) for i in range(0, len(toks), words)] or [text]


def write_real(data_dir: Path, out: Path, n: int = 20_000, n_queries: int = 1000, seed: int = 0) -> tuple[Path, list]:
    """The real-text point: SciFact and the ImpliRet corpora cut into passages of at most 80 words, the first ``n``
    of them (SciFact first) as ``out/corpus.jsonl``; plus ``n_queries`` real queries (SciFact's and ImpliRet's,
    sampled under ``seed``). SciFact alone (5,183 documents) is too small for 20k."""
    sources = [data_dir / "beir" / "scifact"] + sorted(p for p in (data_dir / "impliret").iterdir() if p.is_dir())
    rows, queries = [], []
    for src in sources:
        for line in (src / "corpus.jsonl").read_text().splitlines():
            obj = json.loads(line)
            text = f"{obj.get('title') or ''} {obj['text']}".strip()
            rows += [{"id": f"{src.name}:{obj['id']}:{j}", "text": p} for j, p in enumerate(_passages(text))]
        queries += [json.loads(x)["text"] for x in (src / "queries.jsonl").read_text().splitlines()]
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} passages in {', '.join(map(str, sources))}; need {n}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    pick = np.random.default_rng(seed).choice(len(queries), size=min(n_queries, len(queries)), replace=False)
    return out, [queries[i] for i in sorted(pick)]
