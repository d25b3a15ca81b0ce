"""BRIGHT (Su et al. 2024, arXiv 2407.12883): 12 reasoning-intensive retrieval tasks, short-document setting.

Protocol (docs/algorithm.md section 3; FlagEmbedding's ``evaluation.bright``, which ReasonEmbed's scripts run):
- queries: the ``examples`` config, split = task name; rows ``{id, query, gold_ids, excluded_ids, ...}``;
- corpus: the ``documents`` config, split = task name; rows ``{id, content}``;
- relevant = ``gold_ids`` (relevance 1); each query's ``excluded_ids`` (``"N/A"`` = none) are removed from its
  ranking before scoring (``reasonembed.evaluation.runs.remove_excluded``); retrieve the top 2000 first.

Three sources, same parsing: the hub (``datasets``, online), local files shaped like hub rows (parquet/jsonl,
``examples_file``/``documents_file``), or a local folder in the shared layout (``queries.jsonl`` with
``excluded_ids``/``gold_ids``, ``qrels.tsv``, and ``corpus.jsonl`` when present).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from reasonembed.data.beir import NO_EXCLUSION, load_beir_folder
from reasonembed.data.readers import (
    files_revision,
    iter_jsonl,
    load_hf_dataset,
    read_rows,
    require_id,
    require_text,
    sha256_file,
)
from reasonembed.data.types import (
    Corpus,
    DataError,
    DataWarning,
    HubOptions,
    Queries,
    RetrievalTask,
    validate_task,
)

# The hub id (the GitHub org is xlang-ai; the dataset lives under xlangai).
BRIGHT_HUB_REPO = "xlangai/BRIGHT"

BRIGHT_TASKS: tuple[str, ...] = (
    "biology", "earth_science", "economics", "psychology", "robotics", "stackoverflow", "sustainable_living",
    "leetcode", "pony", "aops", "theoremqa_questions", "theoremqa_theorems",
)

_SE_DOMAINS = {
    "biology": "a Biology", "earth_science": "an Earth Science", "economics": "an Economics",
    "psychology": "a Psychology", "robotics": "a Robotics", "stackoverflow": "a Stack Overflow",
    "sustainable_living": "a Sustainable Living",
}

# Per-task query instructions (docs/algorithm.md section 3; wording as in FlagEmbedding's BrightShortInstructions).
BRIGHT_INSTRUCTIONS: dict[str, str] = {
    **{t: f"Given {d} post, retrieve relevant passages that help answer the post." for t, d in _SE_DOMAINS.items()},
    "leetcode": "Given a Coding problem, retrieve relevant examples that help answer the problem.",
    "pony": "Given a Pony question, retrieve relevant passages that help answer the question.",
    "aops": "Given a Math problem, retrieve relevant examples that help answer the problem.",
    "theoremqa_questions": "Given a Math problem, retrieve relevant examples that help answer the problem.",
    "theoremqa_theorems": "Given a Math problem, retrieve relevant theorems that help answer the problem.",
}


def _check_task(task: str) -> None:
    if task not in BRIGHT_TASKS:
        raise DataError(f"unknown BRIGHT task {task!r}; known: {', '.join(BRIGHT_TASKS)}")


def _id_list(value: Any, where: str, field: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):  # a single id stored as a string
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: {field} must be a list of doc ids, got {type(value).__name__}")
    return [str(v) for v in value if str(v) != NO_EXCLUSION]


def parse_bright_examples(
    rows: Iterable[dict[str, Any]], source: str = "examples"
) -> tuple[Queries, dict[str, dict[str, int]], dict[str, list[str]]]:
    """Rows of the ``examples`` config -> (queries, qrels from ``gold_ids``, excluded ids per query)."""
    ids: list[str] = []
    texts: list[str] = []
    qrels: dict[str, dict[str, int]] = {}
    excluded: dict[str, list[str]] = {}
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        qid = require_id(row, where, ("id",))
        ids.append(qid)
        texts.append(require_text(row, where, ("query", "text")))
        gold = _id_list(row.get("gold_ids"), where, "gold_ids")
        if gold:
            qrels[qid] = {d: 1 for d in gold}
        ex = _id_list(row.get("excluded_ids"), where, "excluded_ids")
        if ex:
            excluded[qid] = ex
    return Queries(ids=ids, texts=texts), qrels, excluded


def parse_bright_documents(rows: Iterable[dict[str, Any]], source: str = "documents") -> Corpus:
    """Rows of the ``documents`` config (``{id, content}``) -> corpus; the content is embedded as is."""
    ids: list[str] = []
    texts: list[str] = []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        ids.append(require_id(row, where, ("id",)))
        texts.append(require_text(row, where, ("content", "text")))
    return Corpus(ids=ids, texts=texts)


def _check_gold_matches_qrels(task: RetrievalTask, queries_file: Path) -> None:
    """The shared folders carry gold_ids in queries.jsonl and a qrels.tsv; they must agree (warn with a count)."""
    mismatched = []
    for _, obj in iter_jsonl(queries_file):
        qid = str(obj.get("id"))
        if qid not in task.qrels or "gold_ids" not in obj:
            continue
        gold = set(_id_list(obj["gold_ids"], str(queries_file), "gold_ids"))
        rel = {d for d, r in task.qrels[qid].items() if r > 0}
        if gold != rel:
            mismatched.append(qid)
    if mismatched:
        task.metadata.setdefault("validation", {})["gold_ids_differ_from_qrels"] = len(mismatched)
        warnings.warn(
            f"{task.name}: {len(mismatched)} queries have gold_ids different from {queries_file.parent}/qrels.tsv "
            f"(e.g. {mismatched[:5]}); scoring uses qrels.tsv",
            DataWarning,
            stacklevel=4,  # 1 this function, 2 _load_folder, 3 load_bright, 4 its caller
        )


def load_bright(
    task: str,
    *,
    data_dir: str | Path | None = None,
    examples_file: str | Path | None = None,
    documents_file: str | Path | None = None,
    query_split: str = "examples",
    require_corpus: bool = True,
    hub: HubOptions | None = None,
) -> RetrievalTask:
    """Load one BRIGHT task as a validated ``RetrievalTask`` with its instruction and excluded ids.

    Sources, first match wins:
    1. ``data_dir``: a local folder, either the task folder itself or a parent holding ``<task>/`` (the shared
       layout). ``documents_file`` can supply the corpus when the folder has none.
    2. ``examples_file`` (+ ``documents_file``): local parquet/jsonl files with hub-shaped rows.
    3. the hub: ``datasets.load_dataset(hub.repo, query_split / "documents", split=task, revision=hub.revision)``
       (``hub``: :class:`~reasonembed.data.types.HubOptions`; default repo ``xlangai/BRIGHT``, revision ``main``).

    ``query_split`` picks the hub config of queries: ``examples`` (original queries, the paper's setting) or e.g.
    ``gpt4_reason`` (LLM-reasoning queries). ``require_corpus=False`` allows a queries-only task.
    """
    _check_task(task)
    hub = hub or HubOptions()
    corpus_override = None
    if documents_file is not None:
        corpus_override = parse_bright_documents(read_rows(documents_file), str(documents_file))
    if data_dir is not None:
        return _load_folder(task, Path(data_dir), documents_file, corpus_override, require_corpus)
    metadata: dict[str, Any] = {"hub_repo": hub.repo or BRIGHT_HUB_REPO, "query_split": query_split}
    if examples_file is not None:
        queries, qrels, excluded = _load_example_files(examples_file, documents_file, metadata)
        corpus = corpus_override or Corpus(ids=[], texts=[])
    else:
        queries, qrels, excluded, corpus = _load_hub(task, hub, corpus_override, metadata)
    t = RetrievalTask(
        name=task, corpus=corpus, queries=queries, qrels=qrels, excluded_ids=excluded,
        instruction=BRIGHT_INSTRUCTIONS[task], benchmark="bright", metadata=metadata,
    )
    return validate_task(t, require_corpus=require_corpus, source=metadata["source"])


def _load_folder(
    task: str, folder: Path, documents_file: str | Path | None, corpus_override: Corpus | None, require_corpus: bool
) -> RetrievalTask:
    """Source 1 of :func:`load_bright`: a folder in the shared layout, its corpus optionally from ``documents_file``."""
    if not (folder / "queries.jsonl").is_file() and (folder / task).is_dir():
        folder = folder / task
    # The folder's own corpus.jsonl is required only when no documents_file supplies the corpus.
    t = load_beir_folder(
        folder, name=task, instruction=BRIGHT_INSTRUCTIONS[task], benchmark="bright", title_mode="none",
        require_corpus=require_corpus and corpus_override is None,
    )
    _check_gold_matches_qrels(t, folder / "queries.jsonl")
    if corpus_override is not None:
        t.corpus = corpus_override
        t.metadata["files"]["documents"] = sha256_file(documents_file)
        t.metadata["revision"] = files_revision(t.metadata["files"])
        t = validate_task(t, require_corpus=require_corpus, source=str(folder))
    return t


def _load_example_files(
    examples_file: str | Path, documents_file: str | Path | None, metadata: dict[str, Any]
) -> tuple[Queries, dict[str, dict[str, int]], dict[str, list[str]]]:
    """Source 2 of :func:`load_bright`: hub-shaped row files; their sha256s are the revision, in ``metadata``."""
    queries, qrels, excluded = parse_bright_examples(read_rows(examples_file), str(examples_file))
    metadata["source"] = str(examples_file)
    metadata["files"] = {"examples": sha256_file(examples_file)}
    if documents_file is not None:
        metadata["files"]["documents"] = sha256_file(documents_file)
    metadata["revision"] = files_revision(metadata["files"])
    return queries, qrels, excluded


def _load_hub(
    task: str, hub: HubOptions, corpus_override: Corpus | None, metadata: dict[str, Any]
) -> tuple[Queries, dict[str, dict[str, int]], dict[str, list[str]], Corpus]:
    """Source 3 of :func:`load_bright`: the hub; the datasets' fingerprints go into ``metadata``."""
    repo, split = hub.repo or BRIGHT_HUB_REPO, metadata["query_split"]
    ex_ds = load_hf_dataset(repo, split, task, hub.revision, hub.cache_dir)
    queries, qrels, excluded = parse_bright_examples(ex_ds, f"{repo}:{split}/{task}")
    if corpus_override is not None:
        corpus = corpus_override
    else:
        doc_ds = load_hf_dataset(repo, "documents", task, hub.revision, hub.cache_dir)
        corpus = parse_bright_documents(doc_ds, f"{repo}:documents/{task}")
        metadata["documents_fingerprint"] = getattr(doc_ds, "_fingerprint", None)
    metadata["source"] = f"hf://{repo}"
    metadata["revision"] = hub.revision or "main"
    metadata["examples_fingerprint"] = getattr(ex_ds, "_fingerprint", None)
    return queries, qrels, excluded, corpus
