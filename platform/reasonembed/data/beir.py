"""BEIR-layout folders, local or on S3: a corpus, queries and qrels, in the variants users' folders come in.

This is the layout of BEIR's releases and of every folder under the shared data (``beir/scifact``,
``impliret/*``, ``bright/*``). Accepted (docs/operations.md, "Folder layouts accepted"):

- ``corpus`` and ``queries`` tables as ``.jsonl``, ``.jsonl.gz`` or ``.parquet`` (R2MED's ``query.*`` name too);
  records keyed by ``id`` or BEIR's ``_id``, text in ``text`` (queries: or ``query``), with or without a ``title``;
  queries may carry their own ``instruction`` and BRIGHT's ``excluded_ids``;
- qrels at ``qrels.tsv`` or ``qrels/<split>.tsv`` (also ``.tsv.gz``, ``.txt``), with or without a header line, 3
  columns or TREC's 4 (``reasonembed.data.readers.read_qrels``);
- the folder itself local or ``s3://bucket/prefix`` (its known files are downloaded to a temporary folder and read
  the same way; messages and ``metadata["source"]`` name the S3 objects).

Two variants of one file in the same folder (``corpus.jsonl`` and ``corpus.parquet``, ``qrels.tsv`` and
``qrels/test.tsv``) are an error naming both rather than a silent pick, since they may disagree.

Document text follows MTEB / sentence-transformers (and FlagEmbedding's BRIGHT evaluator): when a record has a
title, the text to embed is ``f"{title} {text}".strip()``; otherwise it is ``text`` unchanged. With SciFact this is
what gives all-MiniLM-L6-v2 its MTEB nDCG@10 of 0.645. The shared ``beir/scifact`` folder already stores
``text = title + " " + abstract`` (its SOURCE.md), so the default ``title_mode="auto"`` prepends the title only
when the text does not already start with it; ``"prepend"`` always does, ``"none"`` never does.
"""

from __future__ import annotations

import posixpath
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow.fs as pafs

from reasonembed.data.readers import (
    TABLE_SUFFIXES,
    files_revision,
    iter_records,
    read_qrels,
    require_id,
    require_text,
    sha256_file,
)
from reasonembed.data.types import Corpus, DataError, Queries, RetrievalTask, validate_task
from reasonembed.storage import Location, StorageError, is_s3

TitleMode = Literal["auto", "prepend", "none"]

# Placeholder BRIGHT uses in excluded_ids for "nothing to exclude".
NO_EXCLUSION = "N/A"

# File stems looked for, in order: the first stem with a file wins (R2MED's release names its queries query.jsonl).
CORPUS_STEMS = ("corpus",)
QUERIES_STEMS = ("queries", "query")
QRELS_SUFFIXES = (".tsv", ".tsv.gz", ".txt")


def doc_text(title: str | None, text: str, mode: TitleMode = "auto") -> str:
    """The string to embed for a document (see the module docstring)."""
    if not title or mode == "none":
        return text
    if mode == "auto" and (text == title or text.startswith(title + " ")):
        return text
    return f"{title} {text}".strip()


def read_corpus(path: str | Path, title_mode: TitleMode = "auto") -> Corpus:
    """Read a corpus table (``id``/``_id``, ``text``, optional ``title``; ``.jsonl``, ``.jsonl.gz`` or
    ``.parquet``)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"corpus file not found: {p}")
    ids: list[str] = []
    texts: list[str] = []
    titles: list[str] = []
    any_title = False
    for where, obj in iter_records(p):
        ids.append(require_id(obj, where))
        title = obj.get("title") or ""
        if not isinstance(title, str):
            raise DataError(f"{where}: field 'title' must be a string, got {type(title).__name__}")
        any_title = any_title or bool(title)
        titles.append(title)
        texts.append(doc_text(title, require_text(obj, where, ("text", "content")), title_mode))
    return Corpus(ids=ids, texts=texts, titles=titles if any_title else None)


def read_queries(path: str | Path) -> tuple[Queries, dict[str, list[str]]]:
    """Read a queries table (``id``/``_id``, ``text`` or ``query``, optional per-query ``instruction``); also
    returns per-query ``excluded_ids`` when the records carry them (BRIGHT), with BRIGHT's ``"N/A"`` placeholder
    removed. ``Queries.instructions`` stays None unless some record has an ``instruction``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"queries file not found: {p}")
    ids: list[str] = []
    texts: list[str] = []
    instructions: list[str | None] = []
    excluded: dict[str, list[str]] = {}
    for where, obj in iter_records(p):
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


def _instruction(obj: dict[str, Any], where: str) -> str | None:
    """A query record's own ``instruction`` (None when absent); anything but a string is a DataError, since a
    number or list would be embedded as its repr."""
    value = obj.get("instruction")
    if value is None or isinstance(value, str):
        return value
    raise DataError(f"{where}: field 'instruction' must be a string, got {type(value).__name__}")


def _one_variant(folder: Path, names: list[str], what: str) -> Path | None:
    """The one file of ``names`` present in ``folder`` (None if none); two or more is an ambiguity error."""
    found = [folder / n for n in names if (folder / n).is_file()]
    if len(found) > 1:
        shown = " and ".join(str(f.relative_to(folder)) for f in found)
        raise DataError(
            f"{folder}: ambiguous {what}: both {shown} are present; keep exactly one (they may disagree, and picking "
            "one silently would evaluate data you did not mean)."
        )
    return found[0] if found else None


def find_table(folder: Path, stems: tuple[str, ...], what: str) -> Path | None:
    """The corpus or queries table of a folder: the first of ``stems`` with a file in any of ``TABLE_SUFFIXES``."""
    for stem in stems:
        found = _one_variant(folder, [stem + s for s in TABLE_SUFFIXES], what)
        if found is not None:
            return found
    return None


def find_queries(folder: Path) -> Path | None:
    """The queries table of a folder (``queries.*``, else R2MED's ``query.*``), None when there is none."""
    return find_table(folder, QUERIES_STEMS, "queries file")


def _qrels_names(split: str) -> list[str]:
    return [f"qrels{s}" for s in QRELS_SUFFIXES] + [f"qrels/{split}{s}" for s in QRELS_SUFFIXES]


def find_qrels(folder: Path, split: str = "test") -> Path:
    """The qrels file of a folder: ``qrels.tsv`` or ``qrels/<split>.tsv`` (or ``.tsv.gz``, ``.txt``). Missing is a
    DataError listing what was looked for; more than one is an ambiguity DataError naming them."""
    candidates = _qrels_names(split)
    found = _one_variant(folder, candidates, "qrels file")
    if found is None:
        raise DataError(
            f"no qrels file in {folder}: looked for {', '.join(candidates)}. "
            "A task without relevance judgements cannot be scored."
        )
    return found


@dataclass(frozen=True)
class _Options:
    """``load_beir_folder``'s reading options, passed on together to the local and S3 paths."""

    split: str
    title_mode: TitleMode
    instruction: str | None
    benchmark: str
    require_corpus: bool


def load_beir_folder(
    path: str | Path | Location,
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
        path: the folder (corpus, queries, qrels; module docstring): a local path, an ``s3://bucket/prefix`` URI,
            or a :class:`~reasonembed.storage.Location` (an S3 folder with the job's storage settings, e.g. a
            custom endpoint).
        name: task name (default: the folder name).
        split: which ``qrels/<split>.tsv`` to use when there is no top-level ``qrels.tsv``.
        title_mode: how titles join the text (module docstring).
        instruction: query instruction recorded on the task.
        benchmark: benchmark family recorded on the task (``beir``, ``impliret``, ...).
        require_corpus: when False a folder without a corpus loads with an empty corpus (queries-only folders
            such as the shared BRIGHT ones); otherwise a missing corpus is a DataError.
    """
    opts = _Options(split, title_mode, instruction, benchmark, require_corpus)
    if isinstance(path, Location) and not is_s3(path.uri):
        path = path.uri
    if isinstance(path, Location) or is_s3(str(path)):
        return _load_s3_folder(path if isinstance(path, Location) else Location(str(path)), name, opts)
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"task folder not found: {folder}")
    return _load_local_folder(folder, name or folder.name, str(folder.resolve()), opts)


def _load_local_folder(folder: Path, name: str, source: str, opts: _Options) -> RetrievalTask:
    """Read and validate a local folder; ``source`` is what metadata and messages call it."""
    qrels_path = find_qrels(folder, opts.split)
    queries_path = find_queries(folder)
    if queries_path is None:
        raise DataError(
            f"queries file not found in {folder}: looked for queries (or query) with "
            f"{', '.join(TABLE_SUFFIXES)}. A task needs its queries."
        )
    corpus_path = find_table(folder, CORPUS_STEMS, "corpus file")
    files = {queries_path.name: queries_path, qrels_path.name: qrels_path}
    if corpus_path is not None:
        corpus = read_corpus(corpus_path, opts.title_mode)
        files[corpus_path.name] = corpus_path
    elif opts.require_corpus:
        raise DataError(
            f"corpus file not found: {folder / 'corpus.jsonl'} (nor {', '.join(TABLE_SUFFIXES[1:])}). Retrieval "
            "needs the documents; for BRIGHT the shared data has queries and qrels only (load the corpus from the "
            "hub, or put corpus.jsonl in the folder)."
        )
    else:
        corpus = Corpus(ids=[], texts=[])
    queries, excluded = read_queries(queries_path)
    task = RetrievalTask(
        name=name,
        corpus=corpus,
        queries=queries,
        qrels=read_qrels(qrels_path),
        excluded_ids=excluded,
        instruction=opts.instruction,
        benchmark=opts.benchmark,
        metadata={
            "source": source,
            "files": {k: sha256_file(v) for k, v in files.items()},
            "title_mode": opts.title_mode,
            "has_source_md": (folder / "SOURCE.md").is_file(),
        },
    )
    task.metadata["revision"] = files_revision(task.metadata["files"])
    return validate_task(task, require_corpus=opts.require_corpus, source=source)


def _load_s3_folder(loc: Location, name: str | None, opts: _Options) -> RetrievalTask:
    """Download the folder's known files to a temporary folder and read that like a local one; messages and
    ``metadata["source"]`` name the S3 URI. The copy is deleted afterwards: the task holds everything it read."""
    name = name or posixpath.basename(loc.path.rstrip("/"))
    with tempfile.TemporaryDirectory(prefix="reasonembed-task-") as tmp:
        local = Path(tmp)
        _download_known_files(loc, local, opts.split)
        with _named_as(local, loc.uri.rstrip("/")):
            return _load_local_folder(local, name, loc.uri, opts)


def _download_known_files(loc: Location, local: Path, split: str) -> None:
    """Copy the files a BEIR folder may hold (module docstring) from ``loc`` into ``local``, streaming (a corpus may
    be large); other objects under the prefix are left alone. A missing folder is a DataError."""
    known = [s + x for s in CORPUS_STEMS + QUERIES_STEMS for x in TABLE_SUFFIXES] + _qrels_names(split)
    known.append("SOURCE.md")
    try:
        if not loc.exists():
            raise DataError(f"task folder not found: {loc.uri}")
        present = set(loc.list()) | {f"qrels/{n}" for n in loc.list("qrels")}
        for rel in sorted(present.intersection(known)):
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(posixpath.join(loc.path, rel), str(local / rel), source_filesystem=loc.fs,
                            destination_filesystem=pafs.LocalFileSystem())
    except (StorageError, OSError) as exc:
        raise DataError(f"cannot read the task folder {loc.uri}: {exc}") from exc


@contextmanager
def _named_as(local: Path, uri: str) -> Iterator[None]:
    """Errors and warnings raised while reading the downloaded copy name the S3 objects, not the temporary files
    the user never sees."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except DataError as exc:
            raise DataError(str(exc).replace(str(local), uri)) from exc
        finally:
            pending = list(caught)
    for w in pending:
        warnings.warn(str(w.message).replace(str(local), uri), w.category, stacklevel=4)
