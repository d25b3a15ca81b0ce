"""End-of-training retrieval check: encode a BEIR-layout dev set with a model, search it exactly, score it.

Same path as the platform's evaluation: ``Embedder`` (queries as ``Instruct: {task}\\nQuery: {q}``, documents
without instruction) -> ``SearchIndex`` (exact inner product, excluded ids dropped after retrieval) ->
``evaluation.metrics.evaluate`` (trec_eval conventions, MTEB key names).
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

from reasonembed.config.base import StorageConfig

if TYPE_CHECKING:
    from reasonembed.config.train import DevEvalSettings


def retrieval_metrics(embedder, task, qids: list[str], q_texts: list[str], k: int = 100,
                      doc_embeddings=None) -> dict[str, float]:
    """nDCG/recall/MRR of ``embedder`` on ``task`` restricted to the queries ``qids`` (corpus embeddings may be
    passed in when already computed)."""
    from reasonembed.evaluation.metrics import HEADLINE_METRICS, evaluate
    from reasonembed.index.faiss_index import SearchIndex

    docs = doc_embeddings if doc_embeddings is not None else embedder.encode(task.corpus.texts)
    queries = embedder.encode(q_texts, is_query=True)
    index = SearchIndex.build(docs, task.corpus.ids)
    hits = index.search(queries, k, excluded=[task.excluded_ids.get(q, []) for q in qids])
    run = {q: dict(h) for q, h in zip(qids, hits, strict=True)}
    res = evaluate({q: task.qrels[q] for q in qids}, run)
    return {m: res.mean[m] for m in HEADLINE_METRICS if m in res.mean} | {"n_queries": res.n_queries}


def evaluate_model(model: str, dev: DevEvalSettings, storage: StorageConfig | None = None,
                   max_length: int | None = None) -> dict[str, Any]:
    """Evaluate a model reference or exported folder (local or s3://) on the BEIR folder ``dev.data``.

    ``dev`` gives split, query instruction, query cap and k (the run's ``eval`` settings). ``dev.instruction`` None:
    the exported folder's recorded query instruction (``reasonembed.json``), if any.
    """
    import json
    from pathlib import Path

    from reasonembed.config.embedder import EmbedderConfig
    from reasonembed.data.beir import load_beir_folder
    from reasonembed.models.embedder import Embedder
    from reasonembed.redapter.session import fetched
    from reasonembed.storage import is_s3

    t0 = time.time()
    instruction = dev.instruction
    task = load_beir_folder(dev.data, split=dev.split)
    qids = list(task.queries.ids)[: dev.max_queries] if dev.max_queries else list(task.queries.ids)
    texts = dict(zip(task.queries.ids, task.queries.texts, strict=True))
    local = Path(model).expanduser()
    with fetched(model, storage) if is_s3(model) else contextlib.nullcontext(local if local.is_dir() else None) as folder:
        ref = str(folder) if folder is not None else model
        if instruction is None and folder is not None and (folder / "reasonembed.json").is_file():
            instruction = json.loads((folder / "reasonembed.json").read_text()).get("query_instruction")
        emb = Embedder(EmbedderConfig(model=ref, query_instruction=instruction or None, max_length=max_length))
        out = retrieval_metrics(emb, task, qids, [texts[q] for q in qids], dev.k)
    return {**out, "model": model, "task": task.name, "instruction": instruction, "seconds": round(time.time() - t0, 2)}

