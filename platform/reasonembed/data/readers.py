"""Readers for the files benchmark folders are made of: JSON lines, qrels (TSV or TREC) and Hugging Face-style
row files (parquet / jsonl). Every error names the file and the line; every id is read as a string.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reasonembed.data.types import DataError, DataWarning


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (recorded in task metadata as the data revision of local folders)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def files_revision(files: dict[str, str]) -> str:
    """A short data revision for local files: ``sha256:`` + the first 12 hex of each file's sha256, by file name."""
    return "sha256:" + "+".join(v[:12] for _, v in sorted(files.items()))


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line; a bad line is a DataError naming file:line."""
    p = Path(path)
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{n}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def require_id(obj: dict[str, Any], where: str, keys: tuple[str, ...] = ("id", "_id")) -> str:
    """The record's id as a string, from the first present key of ``keys``; missing/empty is a DataError."""
    for k in keys:
        if k in obj and obj[k] is not None and str(obj[k]) != "":
            return str(obj[k])
    raise DataError(f"{where}: record has no id (expected one of {list(keys)}); keys present: {sorted(obj)}")


def require_text(obj: dict[str, Any], where: str, keys: tuple[str, ...] = ("text",)) -> str:
    """The record's text; a missing or non-string field is a DataError (an empty string is allowed and warned
    about later by ``validate_task``)."""
    for k in keys:
        if k in obj:
            v = obj[k]
            if v is None:
                return ""
            if not isinstance(v, str):
                raise DataError(f"{where}: field {k!r} must be a string, got {type(v).__name__}")
            return v
    raise DataError(f"{where}: record has no text field (expected one of {list(keys)}); keys present: {sorted(obj)}")


def _parse_rel(raw: str, where: str) -> int:
    try:
        value = float(raw)
    except ValueError as exc:
        raise DataError(f"{where}: relevance {raw!r} is not a number") from exc
    if value != int(value):
        raise DataError(f"{where}: relevance {raw!r} is not an integer (trec_eval uses integer levels)")
    return int(value)


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """Read qrels into ``qrels[qid][docid] = int``.

    Accepted layouts (tab or whitespace separated):
    - BEIR TSV: ``query-id  corpus-id  score``, with or without a header line;
    - TREC qrels: ``qid  iteration  docid  relevance`` (4 columns).

    Duplicate (qid, docid) rows with the same relevance are collapsed (warned); with different relevance they are a
    DataError, because there is no honest way to pick one.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"qrels file not found: {p}")
    qrels: dict[str, dict[str, int]] = {}
    n_dup = 0
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t") if "\t" in line else line.split()
            parts = [x.strip() for x in parts]
            where = f"{p}:{n}"
            if len(parts) == 3:
                qid, docid, raw = parts
            elif len(parts) == 4:
                qid, _, docid, raw = parts
            else:
                raise DataError(f"{where}: expected 3 (qid docid score) or 4 (TREC) columns, got {len(parts)}")
            if n == 1 and not raw.lstrip("-").replace(".", "", 1).isdigit():
                continue  # header line, e.g. "query-id corpus-id score"
            rel = _parse_rel(raw, where)
            prev = qrels.setdefault(qid, {}).get(docid)
            if prev is not None:
                if prev != rel:
                    raise DataError(f"{where}: ({qid}, {docid}) judged twice with different relevance ({prev}, {rel})")
                n_dup += 1
            qrels[qid][docid] = rel
    if not qrels:
        raise DataError(f"{p}: qrels file has no judgements")
    if n_dup:
        warnings.warn(f"{p}: {n_dup} duplicate qrels rows collapsed", DataWarning, stacklevel=2)
    return qrels


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a Hugging Face-style data file: ``.parquet`` (via pyarrow) or ``.jsonl``/``.json`` lines.

    Used to point the hub parsers at local files shaped like hub rows (offline mirrors, tests).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    if p.suffix in (".jsonl", ".json"):
        return [obj for _, obj in iter_jsonl(p)]
    raise DataError(f"{p}: unsupported row file type {p.suffix!r} (use .parquet or .jsonl)")


def load_hf_dataset(repo: str, config: str, split: str, revision: str | None, cache_dir: str | None) -> Any:
    """``datasets.load_dataset(repo, config, split=split, revision=...)``, importing ``datasets`` lazily.

    ``datasets`` is optional: offline installs evaluate from local folders instead.
    """
    try:
        import datasets
    except ImportError as exc:  # the hub path is optional; local folders need no extra package
        raise DataError(
            f"loading {repo} ({config}/{split}) from the Hugging Face hub needs the `datasets` package: "
            "`pip install datasets`, or pass a local folder (data_dir=...) with corpus.jsonl, queries.jsonl, qrels.tsv"
        ) from exc
    try:
        return datasets.load_dataset(repo, config, split=split, revision=revision, cache_dir=cache_dir)
    except Exception as exc:  # datasets raises many types (offline, missing config, auth); name the request
        raise DataError(
            f"could not load {repo} (config {config!r}, split {split!r}, revision {revision or 'main'}) from the "
            f"Hugging Face hub: {type(exc).__name__}: {exc}. Offline? Point data_dir at a local copy instead."
        ) from exc
