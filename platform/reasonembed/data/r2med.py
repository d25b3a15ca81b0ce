"""R2MED (Li et al. 2025, arXiv 2505.14558): 8 reasoning-driven medical retrieval tasks.

Hub layout (one dataset per task, ``R2MED/<task>``), as read by MTEB's and FlagEmbedding's R2MED loaders:
- config ``corpus``, split ``corpus``: ``{id, text}``;
- config ``query``, split ``query``: ``{id, text}``;
- config ``qrels``, split ``qrels``: ``{q_id, p_id, score}``; relevance is the integer ``score``.

Max length 512 and the per-task instructions below are those of ReasonEmbed's ``evaluation_r2med``. The length is
stored as ``metadata["max_length"]``; ``reasonembed evaluate`` encodes the task at it even when the embedder is
configured longer (``evaluation.pipeline.task_max_length`` gives the precedence). Revisions default to the ones MTEB
pins, so numbers are reproducible; pass ``hub=HubOptions(revision="main")`` for the latest. A local folder
(``corpus.jsonl``, ``queries.jsonl`` or ``query.jsonl``, ``qrels.tsv``/``qrels.txt``) or hub-shaped row files
(parquet/jsonl) work offline.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from reasonembed.data.beir import load_beir_folder
from reasonembed.data.readers import (
    files_revision,
    load_hf_dataset,
    read_rows,
    require_id,
    require_text,
    sha256_file,
)
from reasonembed.data.types import Corpus, DataError, HubOptions, Queries, RetrievalTask, validate_task

R2MED_TASKS: tuple[str, ...] = (
    "Biology", "Bioinformatics", "Medical-Sciences", "MedXpertQA-Exam",
    "MedQA-Diag", "PMC-Treatment", "PMC-Clinical", "IIYi-Clinical",
)

R2MED_INSTRUCTIONS: dict[str, str] = {
    "Biology": "Given a Biology post, retrieve relevant passages that help answer the post.",
    "Bioinformatics": "Given a Bioinformatics post, retrieve relevant passages that help answer the post.",
    "Medical-Sciences": "Given a Medical Science post, retrieve relevant passages that help answer the post.",
    "MedXpertQA-Exam": "Given a Medical Exam, retrieve relevant passages that help answer the exam.",
    "MedQA-Diag": "Given a Medical Exam, retrieve relevant passages that help answer the exam.",
    "PMC-Treatment": "Given a Clinical Case, retrieve relevant passages that help answer the case.",
    "PMC-Clinical": "Given a Clinical Case, retrieve similar cases that help diagnose the case.",
    "IIYi-Clinical": "Given a Clinical Case, retrieve similar cases that help diagnose the case.",
}

# Dataset revisions pinned by MTEB's R2MED tasks (mteb/tasks/retrieval/eng/R2MEDRetrieval.py).
R2MED_REVISIONS: dict[str, str] = {
    "Biology": "8b9fec2db9eda4b5742d03732213fbaee8169556",
    "Bioinformatics": "6021fce366892cbfd7837fa85a4128ea93315e18",
    "Medical-Sciences": "1b48911514c80bf9182222d99752ad75e23b4b47",
    "MedXpertQA-Exam": "b457ea43db9ae5db74c3a3e5be0a213d0f85ac3a",
    "MedQA-Diag": "78b585990279cc01a493f876c1b0cf09557fba57",
    "PMC-Treatment": "53c489a44a3664ba352c07550b72b4525a5968d5",
    "PMC-Clinical": "812829522f7eaa407ef82b96717be85788a50f7e",
    "IIYi-Clinical": "974abbc9bc281c3169180a6aa5d7586cfd2f5877",
}

R2MED_MAX_LENGTH = 512
# The hub owner of the per-task datasets (``R2MED/<task>``).
R2MED_HUB_OWNER = "R2MED"


def _check_task(task: str) -> None:
    if task not in R2MED_TASKS:
        raise DataError(f"unknown R2MED task {task!r}; known: {', '.join(R2MED_TASKS)}")


def parse_r2med_corpus(rows: Iterable[dict[str, Any]], source: str = "corpus") -> Corpus:
    """Rows ``{id, text}`` -> corpus."""
    ids, texts = [], []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        ids.append(require_id(row, where, ("id", "_id")))
        texts.append(require_text(row, where, ("text",)))
    return Corpus(ids=ids, texts=texts)


def parse_r2med_queries(rows: Iterable[dict[str, Any]], source: str = "query") -> Queries:
    """Rows ``{id, text}`` -> queries."""
    ids, texts = [], []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        ids.append(require_id(row, where, ("id", "_id")))
        texts.append(require_text(row, where, ("text", "query")))
    return Queries(ids=ids, texts=texts)


def parse_r2med_qrels(rows: Iterable[dict[str, Any]], source: str = "qrels") -> dict[str, dict[str, int]]:
    """Rows ``{q_id, p_id, score}`` -> ``qrels[qid][docid] = int(score)``; conflicting duplicates are errors."""
    qrels: dict[str, dict[str, int]] = {}
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        missing = [k for k in ("q_id", "p_id", "score") if row.get(k) is None]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing}; keys present: {sorted(row)}")
        qid, pid = str(row["q_id"]), str(row["p_id"])
        try:
            score = float(row["score"])
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: score {row['score']!r} is not a number") from exc
        if score != int(score):
            raise DataError(f"{where}: score {row['score']!r} is not an integer relevance level")
        prev = qrels.setdefault(qid, {}).get(pid)
        if prev is not None and prev != int(score):
            raise DataError(f"{where}: ({qid}, {pid}) judged twice with different scores ({prev}, {int(score)})")
        qrels[qid][pid] = int(score)
    return qrels


def load_r2med(
    task: str,
    *,
    data_dir: str | Path | None = None,
    corpus_file: str | Path | None = None,
    query_file: str | Path | None = None,
    qrels_file: str | Path | None = None,
    hub: HubOptions | None = None,
) -> RetrievalTask:
    """Load one R2MED task as a validated ``RetrievalTask``.

    Sources, first match wins: ``data_dir`` (the task folder or a parent holding ``<task>/``); the three hub-shaped
    row files (``corpus_file``, ``query_file``, ``qrels_file``: parquet or jsonl); the hub ``<hub.repo>/<task>``
    (``hub``: :class:`~reasonembed.data.types.HubOptions`; default owner ``R2MED``, revision: MTEB's pinned one).
    """
    _check_task(task)
    instruction = R2MED_INSTRUCTIONS[task]
    if data_dir is not None:
        folder = Path(data_dir)
        if (folder / task).is_dir():
            folder = folder / task
        t = load_beir_folder(folder, name=task, instruction=instruction, benchmark="r2med", title_mode="none")
        t.metadata["max_length"] = R2MED_MAX_LENGTH
        return t
    metadata: dict[str, Any] = {"max_length": R2MED_MAX_LENGTH}
    files = {"corpus": corpus_file, "query": query_file, "qrels": qrels_file}
    if any(v is not None for v in files.values()):
        corpus, queries, qrels = _load_row_files(task, files, metadata)
    else:
        corpus, queries, qrels = _load_hub(task, hub or HubOptions(), metadata)
    t = RetrievalTask(
        name=task, corpus=corpus, queries=queries, qrels=qrels, instruction=instruction,
        benchmark="r2med", metadata=metadata,
    )
    return validate_task(t, source=metadata["source"])


def _load_row_files(
    task: str, files: dict[str, str | Path | None], metadata: dict[str, Any]
) -> tuple[Corpus, Queries, dict[str, dict[str, int]]]:
    """The three hub-shaped row files (all or none); their sha256s are the revision, recorded in ``metadata``."""
    missing = sorted(k for k, v in files.items() if v is None)
    if missing:
        raise DataError(f"R2MED {task}: row files for {missing} not given; pass corpus_file, query_file, qrels_file")
    corpus = parse_r2med_corpus(read_rows(files["corpus"]), str(files["corpus"]))
    queries = parse_r2med_queries(read_rows(files["query"]), str(files["query"]))
    qrels = parse_r2med_qrels(read_rows(files["qrels"]), str(files["qrels"]))
    metadata["files"] = {k: sha256_file(v) for k, v in files.items()}
    metadata["source"] = str(Path(files["corpus"]).parent)
    metadata["revision"] = files_revision(metadata["files"])
    return corpus, queries, qrels


def _load_hub(
    task: str, hub: HubOptions, metadata: dict[str, Any]
) -> tuple[Corpus, Queries, dict[str, dict[str, int]]]:
    """``<owner>/<task>`` from the hub at the pinned revision unless ``hub.revision`` names another."""
    repo = f"{hub.repo or R2MED_HUB_OWNER}/{task}"
    rev = hub.revision or R2MED_REVISIONS[task]
    corpus = parse_r2med_corpus(load_hf_dataset(repo, "corpus", "corpus", rev, hub.cache_dir), f"{repo}:corpus")
    queries = parse_r2med_queries(load_hf_dataset(repo, "query", "query", rev, hub.cache_dir), f"{repo}:query")
    qrels = parse_r2med_qrels(load_hf_dataset(repo, "qrels", "qrels", rev, hub.cache_dir), f"{repo}:qrels")
    metadata["source"] = f"hf://{repo}"
    metadata["revision"] = rev
    return corpus, queries, qrels
