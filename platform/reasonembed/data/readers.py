"""Readers for the files benchmark folders are made of: JSON lines (plain or gzipped), parquet tables, qrels (TSV or
TREC, plain or gzipped) and Hugging Face-style row files. Every error names the file, the line (the row, for
parquet) and what was expected; every id is read as a string.

The accepted variants are the ones users' BEIR folders come in (docs/operations.md): a ``.jsonl``, ``.jsonl.gz`` or
``.parquet`` table, qrels with or without a header line, 3 columns (qid docid score) or TREC's 4 (qid 0 docid score).
A UTF-8 byte-order mark is tolerated, since spreadsheet exports write one and it would otherwise break line 1.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from reasonembed.data.types import DataError, DataWarning

# The suffixes a corpus or queries table may have, in the order they are looked for.
TABLE_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


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


def open_text(path: Path) -> IO[str]:
    """A text handle on a plain or ``.gz`` file (UTF-8, a leading byte-order mark dropped)."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` of a plain or gzipped text file; a corrupt gzip stream or bytes that are not
    UTF-8 are a DataError naming the file and the line where reading stopped."""
    p = Path(path)
    n = 0
    try:
        with open_text(p) as f:
            for n, line in enumerate(f, start=1):
                yield n, line
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}:{n + 1}: expected UTF-8 text ({exc.reason})") from exc
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError; a truncated stream is an EOFError
        raise DataError(f"{p}:{n + 1}: expected a readable gzip stream ({type(exc).__name__}: {exc})") from exc


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line; a bad line is a DataError naming file:line."""
    p = Path(path)
    for n, line in iter_lines(p):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:{n}: not valid JSON ({exc.msg}); expected one JSON object per line") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{p}:{n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj


def iter_parquet(path: str | Path, batch_size: int = 4096) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(row_number, record)`` (1-based) of a parquet file, a batch at a time so a large corpus is not
    materialised twice; an unreadable file is a DataError naming it."""
    import pyarrow.parquet as pq

    p = Path(path)
    try:
        pf = pq.ParquetFile(p)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError variants; the message is what matters
        raise DataError(f"{p}: expected a parquet file ({type(exc).__name__}: {exc})") from exc
    n = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def iter_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, record)`` of a corpus/queries table (``TABLE_SUFFIXES``); ``where`` is ``file:line`` (JSON
    lines) or ``file:row N`` (parquet), the prefix of every error about that record."""
    p = Path(path)
    if p.name.endswith(".parquet"):
        for n, obj in iter_parquet(p):
            yield f"{p}:row {n}", obj
    elif p.name.endswith((".jsonl", ".jsonl.gz", ".json")):
        for n, obj in iter_jsonl(p):
            yield f"{p}:{n}", obj
    else:
        raise DataError(f"{p}: unsupported table file; expected one of {', '.join(TABLE_SUFFIXES)}")


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
        raise DataError(f"{where}: relevance {raw!r} is not a number; expected an integer score") from exc
    if value != int(value):
        raise DataError(f"{where}: relevance {raw!r} is not an integer (trec_eval uses integer levels)")
    return int(value)


def _is_number(raw: str) -> bool:
    try:
        float(raw)
    except ValueError:
        return False
    return True


def _qrels_row(line: str, where: str) -> tuple[str, str, str]:
    """``(qid, docid, raw score)`` of one qrels line: 3 columns, or TREC's 4 (the second is the unused iteration)."""
    parts = line.strip().split("\t") if "\t" in line else line.split()
    parts = [x.strip() for x in parts]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 4:
        return parts[0], parts[2], parts[3]
    raise DataError(
        f"{where}: expected 3 columns (query-id corpus-id score) or 4 (TREC: qid 0 docid score), got {len(parts)}"
    )


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """Read qrels into ``qrels[qid][docid] = int``.

    Accepted layouts (tab or whitespace separated, plain or ``.gz``):
    - BEIR TSV: ``query-id  corpus-id  score``, with or without a header line;
    - TREC qrels: ``qid  iteration  docid  relevance`` (4 columns).
    A header is recognised only on the first non-blank line, by its non-numeric score column (``score``, ``rel``);
    a non-numeric score anywhere else is an error, never a silently skipped row.

    Duplicate (qid, docid) rows with the same relevance are collapsed (warned); with different relevance they are a
    DataError, because there is no honest way to pick one.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"qrels file not found: {p}")
    qrels: dict[str, dict[str, int]] = {}
    n_dup = 0
    first = True
    for n, line in iter_lines(p):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        qid, docid, raw = _qrels_row(line, where)
        if first and not _is_number(raw):
            first = False
            continue  # header line, e.g. "query-id corpus-id score"
        first = False
        rel = _parse_rel(raw, where)
        prev = qrels.setdefault(qid, {}).get(docid)
        if prev is not None:
            if prev != rel:
                raise DataError(f"{where}: ({qid}, {docid}) judged twice with different relevance ({prev}, {rel})")
            n_dup += 1
        qrels[qid][docid] = rel
    if not qrels:
        raise DataError(f"{p}: qrels file has no judgements; expected lines of query-id, corpus-id, score")
    if n_dup:
        warnings.warn(f"{p}: {n_dup} duplicate qrels rows collapsed", DataWarning, stacklevel=2)
    return qrels


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a Hugging Face-style data file: ``.parquet`` (via pyarrow) or ``.jsonl``/``.jsonl.gz``/``.json`` lines.

    Used to point the hub parsers at local files shaped like hub rows (offline mirrors, tests).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    return [obj for _, obj in iter_records(p)]


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
