"""Training samples from a judged retrieval task: positives from the qrels, hard negatives mined by the platform.

Mining (the platform's own path, as in synthesis stage 2): encode the corpus and the queries with ``Embedder``,
search the exact ``SearchIndex`` and drop each query's relevant documents from its ranking (``excluded``), so the
top remaining documents are the hardest negatives the current model confuses with the positive.

Rows follow the public ReasonEmbed release format (``prompt, query, reasoning_query, pos, neg,
train_group_size, batch_size``) plus ``domain`` and ``sample_id``, ready for ``read_training_data``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def mine_negatives(embedder, task, qids: Sequence[str], n_neg: int, instruction: str | None = None,
                   doc_embeddings=None) -> dict[str, list[str]]:
    """Top ``n_neg`` non-relevant documents per query (relevant = qrels > 0), best first."""
    from reasonembed.index.faiss_index import SearchIndex

    docs = doc_embeddings if doc_embeddings is not None else embedder.encode(task.corpus.texts)
    texts = dict(zip(task.queries.ids, task.queries.texts, strict=True))
    queries = embedder.encode([texts[q] for q in qids], is_query=True, instruction=instruction)
    index = SearchIndex.build(docs, task.corpus.ids)
    positives = [[d for d, r in task.qrels.get(q, {}).items() if r > 0] for q in qids]
    hits = index.search(queries, n_neg + max(map(len, positives), default=0), excluded=positives)
    return {q: [d for d, _ in h[:n_neg]] for q, h in zip(qids, hits, strict=True)}


@dataclass(frozen=True)
class GroupSizes:
    """The release format's per-row size columns. None: the training config decides (``data.train_group_size`` /
    ``data.batch_size`` when set, else its defaults)."""

    train_group_size: int | None = None  # 1 positive + (train_group_size − 1) negatives per query
    batch_size: int | None = None  # queries per device per step


def samples_from_task(task, qids: Sequence[str], negatives: dict[str, list[str]], *, prompt: str = "",
                      domain: str | None = None, sizes: GroupSizes = GroupSizes(),
                      reasoning: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One release-format row per query with at least one relevant document and one negative."""
    doc = dict(zip(task.corpus.ids, task.corpus.texts, strict=True))
    texts = dict(zip(task.queries.ids, task.queries.texts, strict=True))
    rows = []
    for q in qids:
        pos = [doc[d] for d, r in sorted(task.qrels.get(q, {}).items()) if r > 0 and d in doc]
        neg = [doc[d] for d in negatives.get(q, []) if d in doc]
        if not pos or not neg:
            continue
        rows.append({
            "sample_id": f"{task.name}-{q}", "domain": domain or task.name, "prompt": prompt, "query": texts[q],
            "reasoning_query": (reasoning or {}).get(q, ""), "pos": pos, "neg": neg,
            "train_group_size": sizes.train_group_size, "batch_size": sizes.batch_size,
        })
    return rows


def write_jsonl(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return p
