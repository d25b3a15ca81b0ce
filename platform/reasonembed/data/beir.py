"""BEIR-layout folders: ``corpus.jsonl``, ``queries.jsonl`` and qrels (``qrels.tsv`` or ``qrels/<split>.tsv``).

This is the layout of BEIR's releases and of every folder under the shared data (``beir/scifact``,
``impliret/*``, ``bright/*``). Records are keyed by ``id`` or BEIR's ``_id``.

Document text follows MTEB / sentence-transformers (and FlagEmbedding's BRIGHT evaluator): when a record has a
title, the text to embed is ``f"{title} {text}".strip()``; otherwise it is ``text`` unchanged. With SciFact this is
what gives all-MiniLM-L6-v2 its MTEB nDCG@10 of 0.645. The shared ``beir/scifact`` folder already stores
``text = title + " " + abstract`` (its SOURCE.md), so the default ``title_mode="auto"`` prepends the title only
when the text does not already start with it; ``"prepend"`` always does, ``"none"`` never does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from reasonembed.data.readers import (
    files_revision,
    iter_jsonl,
    read_qrels,
    require_id,
    require_text,
    sha256_file,
)
from reasonembed.data.types import Corpus, DataError, Queries, RetrievalTask, validate_task

TitleMode = Literal["auto", "prepend", "none"]

# Placeholder BRIGHT uses in excluded_ids for "nothing to exclude".
NO_EXCLUSION = "N/A"


def doc_text(title: str | None, text: str, mode: TitleMode = "auto") -> str:
    """The string to embed for a document (see the module docstring)."""
    if not title or mode == "none":
        return text
    if mode == "auto" and (text == title or text.startswith(title + " ")):
        return text
    return f"{title} {text}".strip()


def read_corpus(path: str | Path, title_mode: TitleMode = "auto") -> Corpus:
    """Read a corpus.jsonl (``id``/``_id``, ``text``, optional ``title``)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"corpus file not found: {p}")
    ids: list[str] = []
    texts: list[str] = []
    titles: list[str] = []
    any_title = False
    for n, obj in iter_jsonl(p):
        where = f"{p}:{n}"
        ids.append(require_id(obj, where))
        title = obj.get("title") or ""
        if not isinstance(title, str):
            raise DataError(f"{where}: field 'title' must be a string, got {type(title).__name__}")
        any_title = any_title or bool(title)
        titles.append(title)
        texts.append(doc_text(title, require_text(obj, where, ("text", "content")), title_mode))
    return Corpus(ids=ids, texts=texts, titles=titles if any_title else None)


def read_queries(path: str | Path) -> tuple[Queries, dict[str, list[str]]]:
    """Read a queries.jsonl (``id``/``_id``, ``text`` or ``query``, optional per-query ``instruction``); also
    returns per-query ``excluded_ids`` when the records carry them (BRIGHT), with BRIGHT's ``"N/A"`` placeholder
    removed. ``Queries.instructions`` stays None unless some record has an ``instruction``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"queries file not found: {p}")
    ids: list[str] = []
    texts: list[str] = []
    instructions: list[str | None] = []
    excluded: dict[str, list[str]] = {}
    for n, obj in iter_jsonl(p):
        where = f"{p}:{n}"
        qid = require_id(obj, where)
        ids.append(qid)
        texts.append(require_text(obj, where, ("text", "query")))
        instructions.append(_instruction(obj, where))
        ex = obj.get("excluded_ids")
        if ex:
            if not isinstance(ex, list):
                raise DataError(f"{where}: excluded_ids must be a list of doc ids, got {type(ex).__name__}")
            ex = [str(d) for d in ex if str(d) != NO_EXCLUSION]
            if ex:
                excluded[qid] = ex
    has_instructions = any(i is not None for i in instructions)
    return Queries(ids=ids, texts=texts, instructions=instructions if has_instructions else None), excluded


def _instruction(obj: dict, where: str) -> str | None:
    """A query record's own ``instruction`` (None when absent); anything but a string is a DataError, since a
    number or list would be embedded as its repr."""
    value = obj.get("instruction")
    if value is None or isinstance(value, str):
        return value
    raise DataError(f"{where}: field 'instruction' must be a string, got {type(value).__name__}")


def find_qrels(folder: Path, split: str = "test") -> Path:
    """The qrels file of a folder: qrels.tsv, qrels/<split>.tsv, or the same with .txt. Missing is a DataError."""
    candidates = [
        folder / "qrels.tsv",
        folder / "qrels" / f"{split}.tsv",
        folder / "qrels.txt",
        folder / "qrels" / f"{split}.txt",
    ]
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(
        f"no qrels file in {folder}: looked for {', '.join(str(c.relative_to(folder)) for c in candidates)}. "
        "A task without relevance judgements cannot be scored."
    )


def load_beir_folder(
    path: str | Path,
    name: str | None = None,
    *,
    split: str = "test",
    title_mode: TitleMode = "auto",
    instruction: str | None = None,
    benchmark: str = "beir",
    require_corpus: bool = True,
) -> RetrievalTask:
    """Load a BEIR-layout folder into a validated ``RetrievalTask``.

    Args:
        path: the folder (``corpus.jsonl``, ``queries.jsonl``, qrels).
        name: task name (default: the folder name).
        split: which ``qrels/<split>.tsv`` to use when there is no top-level ``qrels.tsv``.
        title_mode: how titles join the text (module docstring).
        instruction: query instruction recorded on the task.
        benchmark: benchmark family recorded on the task (``beir``, ``impliret``, ...).
        require_corpus: when False a folder without ``corpus.jsonl`` loads with an empty corpus (queries-only
            folders such as the shared BRIGHT ones); otherwise a missing corpus is a DataError.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"task folder not found: {folder}")
    qrels_path = find_qrels(folder, split)
    corpus_path = folder / "corpus.jsonl"
    queries_path = folder / "queries.jsonl"
    if not queries_path.is_file() and (folder / "query.jsonl").is_file():
        queries_path = folder / "query.jsonl"  # R2MED's release names it query.jsonl
    files = {queries_path.name: queries_path, qrels_path.name: qrels_path}
    if corpus_path.is_file():
        corpus = read_corpus(corpus_path, title_mode)
        files["corpus.jsonl"] = corpus_path
    elif require_corpus:
        raise DataError(
            f"corpus file not found: {corpus_path}. Retrieval needs the documents; for BRIGHT the shared data has "
            "queries and qrels only (load the corpus from the hub, or put corpus.jsonl in the folder)."
        )
    else:
        corpus = Corpus(ids=[], texts=[])
    queries, excluded = read_queries(queries_path)
    qrels = read_qrels(qrels_path)
    task = RetrievalTask(
        name=name or folder.name,
        corpus=corpus,
        queries=queries,
        qrels=qrels,
        excluded_ids=excluded,
        instruction=instruction,
        benchmark=benchmark,
        metadata={
            "source": str(folder.resolve()),
            "files": {k: sha256_file(v) for k, v in files.items()},
            "title_mode": title_mode,
            "has_source_md": (folder / "SOURCE.md").is_file(),
        },
    )
    task.metadata["revision"] = files_revision(task.metadata["files"])
    return validate_task(task, require_corpus=require_corpus, source=str(folder))
