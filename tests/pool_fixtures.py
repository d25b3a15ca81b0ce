"""Pool-protocol data from real SciFact text, without downloads (tests/test_pool_protocol.py, tests/test_compare.py).

``pool_folder`` writes a BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels.tsv with ``id`` keys) whose qrels are
reranking pools: for each of the first ``n_queries`` judged SciFact queries, its top ``depth`` BM25 documents (over
the folder's corpus) plus its relevant ones, as graded rows: relevant documents 1 or 2, the others 0. The corpus holds
the pooled documents and as many others again, so a retriever that strays outside a pool would be caught. Defects a
user's data may have are planted on purpose: one pool row names a document missing from the corpus, one query keeps
only its score-0 rows (no relevant document), and one query excludes one of its pool documents.

``multiple_choice_folder`` writes a few candidates per query, exactly one correct (accuracy@1).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

MISSING_DOC = "not-in-corpus-1"


def scifact_slice(scifact_dir: Path, n_queries: int) -> tuple[list[dict], dict[str, list[str]], list[dict]]:
    qrels: dict[str, list[str]] = {}
    for line in (scifact_dir / "qrels.tsv").read_text().splitlines()[1:]:
        qid, did, _ = line.split("\t")
        qrels.setdefault(qid, []).append(did)
    queries = [q for q in map(json.loads, (scifact_dir / "queries.jsonl").read_text().splitlines())
               if q["id"] in qrels][:n_queries]
    docs = [json.loads(x) for x in (scifact_dir / "corpus.jsonl").read_text().splitlines()]
    return queries, {q["id"]: qrels[q["id"]] for q in queries}, docs


def _bm25_top(corpus: list[dict], queries: list[dict], depth: int) -> dict[str, list[str]]:
    from reasonembed.evaluation.bm25 import BM25Retriever
    from reasonembed.evaluation.metrics import rank_docs

    retriever = BM25Retriever().index([d["id"] for d in corpus], [d["text"] for d in corpus])
    run = retriever.search([q["id"] for q in queries], [q["text"] for q in queries], k=depth)
    return {q: rank_docs(docs, q)[:depth] for q, docs in run.items()}


def _write(folder: Path, corpus: list[dict], queries: list[dict], rows: list[tuple[str, str, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in rows))
    return folder


def _corpus(docs: list[dict], wanted: set[str], n_others: int) -> list[dict]:
    others = [d for d in docs if d["id"] not in wanted][:n_others]
    return [{"id": d["id"], "title": d.get("title", ""), "text": d["text"]}
            for d in docs if d["id"] in wanted] + others


def pool_folder(scifact_dir: Path, folder: Path, n_queries: int = 50, depth: int = 10) -> Path:
    """The reranking-pool folder (module docstring); returns it."""
    queries, relevant, docs = scifact_slice(scifact_dir, n_queries)
    base = _corpus(docs, {d for v in relevant.values() for d in v}, 400)
    top = _bm25_top(base, queries, depth)
    rows: list[tuple[str, str, int]] = []
    for i, q in enumerate(queries):
        qid = q["id"]
        rel = {d: 1 + zlib.crc32(f"{qid}:{d}".encode()) % 2 for d in relevant[qid]}
        if i == 1:
            rel = {}  # a query with only score-0 rows: no relevant document in its pool
        rows += [(qid, d, g) for d, g in rel.items()]
        rows += [(qid, d, 0) for d in top[qid] if d not in rel]
    rows.append((queries[0]["id"], MISSING_DOC, 0))
    zero_of_q2 = next(d for q, d, g in rows if q == queries[2]["id"] and g == 0)
    queries[2] = {**queries[2], "excluded_ids": [zero_of_q2]}
    pooled = {d for _, d, _ in rows}
    corpus = _corpus(docs, pooled, len(pooled))
    return _write(folder, corpus, queries, rows)


def multiple_choice_folder(scifact_dir: Path, folder: Path, n_queries: int = 30, choices: int = 4) -> Path:
    """Each query: its first relevant document (score 1) and ``choices - 1`` BM25-hard wrong ones (score 0)."""
    queries, relevant, docs = scifact_slice(scifact_dir, n_queries)
    base = _corpus(docs, {d for v in relevant.values() for d in v}, 400)
    top = _bm25_top(base, queries, choices + 5)
    rows: list[tuple[str, str, int]] = []
    for q in queries:
        right = relevant[q["id"]][0]
        wrong = [d for d in top[q["id"]] if d not in relevant[q["id"]]][: choices - 1]
        rows += [(q["id"], right, 1)] + [(q["id"], d, 0) for d in wrong]
    pooled = {d for _, d, _ in rows}
    return _write(folder, _corpus(docs, pooled, 100), queries, rows)


def read_qrels(folder: Path) -> dict[str, dict[str, int]]:
    """The folder's qrels as pytrec_eval wants them (every row, score-0 ones included)."""
    out: dict[str, dict[str, int]] = {}
    for line in (folder / "qrels.tsv").read_text().splitlines()[1:]:
        q, d, s = line.split("\t")
        out.setdefault(q, {})[d] = int(s)
    return out
