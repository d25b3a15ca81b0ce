"""Runs: ``run[qid][docid] = score``. TREC run files, top-k cuts and BRIGHT's excluded-id removal.

TREC run format (trec_eval's input), one line per retrieved document, six whitespace-separated columns:

    <qid> Q0 <docid> <rank> <score> <tag>

Ranks follow trec_eval's own order (``metrics.rank_docs``: float32 score descending, doc id descending on ties), and
scores are written with ``repr`` so that reading the file back gives the same floats and the same metrics.

BRIGHT protocol (BRIGHT's and FlagEmbedding's evaluators): retrieve the top 2000, drop each
query's ``excluded_ids`` (documents that are the query's own source or answer-leaking duplicates), then rank what
is left (``remove_excluded``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from reasonembed.evaluation.metrics import rank_docs

Run = dict[str, dict[str, float]]

_NO_EXCLUSION = "N/A"


def top_k(run: Mapping[str, Mapping[str, float]], k: int) -> Run:
    """Each query's best ``k`` documents in trec_eval order."""
    if k < 1:
        raise ValueError(f"top_k: k must be >= 1, got {k}")
    out: Run = {}
    for qid, docs in run.items():
        out[qid] = {d: docs[d] for d in rank_docs(docs, qid)[:k]}
    return out


@dataclass
class ExclusionStats:
    """How many (query, doc) results ``remove_excluded`` dropped, and from how many queries."""

    n_removed: int = 0
    n_queries_affected: int = 0


def remove_excluded(
    run: Mapping[str, Mapping[str, float]],
    excluded_ids: Mapping[str, list[str] | set[str]],
    k: int | None = None,
    stats: ExclusionStats | None = None,
) -> Run:
    """Drop each query's excluded doc ids from its results, then keep the best ``k`` of the rest (all if None).

    ``excluded_ids[qid]`` may contain BRIGHT's ``"N/A"`` placeholder (ignored). Pass an ``ExclusionStats`` to get
    the counts. The input run is not modified.
    """
    stats = stats if stats is not None else ExclusionStats()
    out: Run = {}
    for qid, docs in run.items():
        ex = {d for d in excluded_ids.get(qid, ()) if d != _NO_EXCLUSION}
        kept = {d: s for d, s in docs.items() if d not in ex} if ex else dict(docs)
        removed = len(docs) - len(kept)
        if removed:
            stats.n_removed += removed
            stats.n_queries_affected += 1
        if k is not None and len(kept) > k:
            kept = {d: kept[d] for d in rank_docs(kept, qid)[:k]}
        out[qid] = kept
    return out


def write_trec_run(run: Mapping[str, Mapping[str, float]], path: str | Path, tag: str = "reasonembed") -> Path:
    """Write a TREC 6-column run file (queries in the run's order, docs in trec_eval order)."""
    if not tag or any(c.isspace() for c in tag):
        raise ValueError(f"TREC run tag must be a non-empty word without spaces, got {tag!r}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for qid, docs in run.items():
            for d in (qid, *docs):
                if not d or any(c.isspace() for c in d):
                    raise ValueError(f"TREC run: id {d!r} (query {qid}) is empty or contains whitespace")
            for rank, d in enumerate(rank_docs(docs, qid), start=1):
                f.write(f"{qid} Q0 {d} {rank} {float(docs[d])!r} {tag}\n")
    tmp.replace(p)  # atomic: a reader never sees half a run
    return p


def read_trec_run(path: str | Path) -> Run:
    """Read a TREC run file into ``run[qid][docid] = score``. Errors name the file and line; a document listed
    twice for a query is an error (trec_eval rejects it too)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"TREC run file not found: {p}")
    run: Run = {}
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 6:
                raise ValueError(f"{p}:{n}: expected 6 columns (qid Q0 docid rank score tag), got {len(parts)}")
            qid, _, docid, _, raw, _ = parts
            try:
                score = float(raw)
            except ValueError as exc:
                raise ValueError(f"{p}:{n}: score {raw!r} is not a number") from exc
            docs = run.setdefault(qid, {})
            if docid in docs:
                raise ValueError(f"{p}:{n}: document {docid} listed twice for query {qid}")
            docs[docid] = score
    return run
