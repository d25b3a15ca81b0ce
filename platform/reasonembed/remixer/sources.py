"""Read a domain corpus (local or s3://; BEIR folder, jsonl or parquet, one or many domains) and the benchmark gold
ids that decontamination removes.

Bad records are never dropped silently: each becomes an error row ``(domain, doc_id, reason, detail)`` with the
file and line, and the prepare manifest counts them. Reasons: ``malformed_json``, ``missing_id``, ``non_text``,
``empty_text``, ``duplicate_id`` (the first record of an id wins).
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from reasonembed.config.base import ConfigError, StorageConfig
from reasonembed.config.synthesize import DecontaminationConfig, SynthDataConfig
from reasonembed.data.beir import NO_EXCLUSION, doc_text, find_qrels
from reasonembed.data.catalog import default_data_dir
from reasonembed.data.readers import iter_jsonl, read_qrels
from reasonembed.storage import Location

CORPUS_EXTS = (".jsonl", ".json", ".parquet")


@dataclass
class DomainCorpus:
    """Valid documents of one domain in file order, plus the rejected records."""

    domain: str
    files: list[str]
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    records: int = 0


def _is_dir(loc: Location, name: str = "") -> bool:
    return loc.fs.get_file_info(loc._p(name)).type == pafs.FileType.Directory


def _files_in(loc: Location, name: str = "") -> list[str]:
    if loc.exists(posixpath.join(name, "corpus.jsonl") if name else "corpus.jsonl"):
        return [loc.child(posixpath.join(name, "corpus.jsonl") if name else "corpus.jsonl")]
    base = Location(loc.child(name), loc.cfg) if name else loc
    return [base.child(n) for n in base.list("", "") if n.endswith(CORPUS_EXTS)]


def domain_files(data: SynthDataConfig, domain: str, storage: StorageConfig | None = None) -> list[str]:
    """Files of one domain: ``<corpus>/<domain>/`` in a multi-domain folder, else the corpus itself (one domain)."""
    if not data.corpus:
        raise ConfigError("data.corpus is empty: give a BEIR folder, a .jsonl/.parquet file or a multi-domain folder "
                          "(--data)")
    corpus = expand_path(data.corpus)
    loc = Location(corpus, storage)
    if not loc.exists():
        raise ConfigError(f"data.corpus: not found: {corpus}")
    if not _is_dir(loc):
        files = [corpus]
    elif loc.exists(domain) and _is_dir(loc, domain):
        files = _files_in(loc, domain)
    elif len(data.domains) == 1:
        files = _files_in(loc)
    else:
        raise ConfigError(
            f"data.corpus: {corpus} has no sub-folder {domain!r}; with several data.domains the corpus must be "
            "a folder holding <domain>/corpus.jsonl for each"
        )
    if not files:
        raise ConfigError(f"data.corpus: no corpus.jsonl, .jsonl or .parquet files for domain {domain!r} in "
                          f"{corpus}")
    return files


def _records(path: str, fmt: str, storage: StorageConfig | None):
    """Yield ``(where, record | None, error)`` for each record of a file."""
    loc = Location(posixpath.dirname(path) if path.startswith("s3://") else str(Path(path).parent), storage)
    name = posixpath.basename(path)
    if fmt == "auto":
        fmt = "parquet" if name.endswith(".parquet") else "jsonl"
    if fmt == "parquet":
        table = pq.read_table(io.BytesIO(loc.read_bytes(name)))
        for i, rec in enumerate(table.to_pylist()):
            yield f"{path}:row {i}", rec, None
        return
    for n, line in enumerate(loc.read_bytes(name).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"{path}:{n}", None, f"not valid JSON ({exc.msg}): {line[:200]}"
            continue
        if not isinstance(rec, dict):
            yield f"{path}:{n}", None, f"expected a JSON object, got {type(rec).__name__}"
            continue
        yield f"{path}:{n}", rec, None


def read_domain(data: SynthDataConfig, domain: str, storage: StorageConfig | None = None) -> DomainCorpus:
    """All records of one domain (first ``data.limit`` records when set), validated."""
    out = DomainCorpus(domain=domain, files=domain_files(data, domain, storage))
    seen: set[str] = set()
    for path in out.files:
        for where, rec, err in _records(path, data.format, storage):
            if data.limit is not None and out.records >= data.limit:
                return out
            out.records += 1
            if err is not None:
                out.errors.append({"domain": domain, "doc_id": "", "reason": "malformed_json", "detail": f"{where}: {err}"})
                continue
            _add(out, rec, where, data, seen)
    return out


def _add(out: DomainCorpus, rec: dict[str, Any], where: str, data: SynthDataConfig, seen: set[str]) -> None:
    raw_id = next((rec[k] for k in (data.id_field, "_id", "id") if rec.get(k) not in (None, "")), None)
    if raw_id is None:
        out.errors.append({"domain": out.domain, "doc_id": "", "reason": "missing_id",
                           "detail": f"{where}: no {data.id_field!r} field; keys: {sorted(rec)[:10]}"})
        return
    doc_id = str(raw_id)
    text = next((rec[k] for k in (data.text_field, "text", "content") if k in rec), None)
    if not isinstance(text, str):
        out.errors.append({"domain": out.domain, "doc_id": doc_id, "reason": "non_text",
                           "detail": f"{where}: field {data.text_field!r} is {type(text).__name__}, not a string"})
        return
    title = rec.get(data.title_field) if data.title_field else None
    text = doc_text(title if isinstance(title, str) else None, text, "auto")
    if not text.strip():
        out.errors.append({"domain": out.domain, "doc_id": doc_id, "reason": "empty_text", "detail": where})
        return
    if doc_id in seen:
        out.errors.append({"domain": out.domain, "doc_id": doc_id, "reason": "duplicate_id",
                           "detail": f"{where}: id already used by an earlier record (the first one is kept)"})
        return
    seen.add(doc_id)
    out.ids.append(doc_id)
    out.texts.append(text)


def expand_path(path: str) -> str:
    """Fill '{data_dir}' with the shared data folder ($REASONEMBED_DATA_DIR, default ../shared/data)."""
    return path.replace("{data_dir}", str(default_data_dir()))


def decontamination_files(cfg: DecontaminationConfig) -> list[Path]:
    """The benchmark files decontamination reads (BEIR: the qrels file; BRIGHT: each task's queries.jsonl): the
    prepare stage fingerprints them with the corpus. A missing folder or file is a ConfigError."""
    if cfg.benchmark == "none":
        return []
    if not cfg.path:
        raise ConfigError(f"data.decontamination.path is empty but benchmark is {cfg.benchmark!r}")
    folder = Path(expand_path(cfg.path)).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"data.decontamination.path: folder not found: {folder} (set it, set REASONEMBED_DATA_DIR, or use "
            "benchmark: none to synthesize without decontamination)"
        )
    if cfg.benchmark == "beir":
        return [find_qrels(folder)]
    tasks = cfg.tasks or sorted(p.name for p in folder.iterdir() if (p / "queries.jsonl").is_file())
    if not tasks:
        raise ConfigError(f"data.decontamination.path: no <task>/queries.jsonl under {folder}")
    files = [folder / task / "queries.jsonl" for task in tasks]
    for qfile in files:
        if not qfile.is_file():
            raise ConfigError(f"data.decontamination.tasks: {qfile} not found")
    return files


def contaminated_ids(cfg: DecontaminationConfig) -> tuple[set[str], dict[str, int]]:
    """Doc ids that must never be sources: (ids, count per benchmark task). A missing folder is a ConfigError."""
    ids: set[str] = set(cfg.extra_ids)
    counts: dict[str, int] = {"extra_ids": len(cfg.extra_ids)} if cfg.extra_ids else {}
    files = decontamination_files(cfg)
    if cfg.benchmark == "beir":
        qrels = read_qrels(files[0])
        rel = {d for per_q in qrels.values() for d, r in per_q.items() if r > 0}
        ids |= rel
        counts[Path(expand_path(cfg.path or "")).expanduser().name] = len(rel)
        return ids, counts
    for qfile in files:
        found: set[str] = set()
        for n, obj in iter_jsonl(qfile):
            for fld in cfg.id_fields:
                value = obj.get(fld) or []
                if isinstance(value, str):
                    value = [value]
                if not isinstance(value, list):
                    raise ConfigError(f"{qfile}:{n}: {fld} must be a list of doc ids, got {type(value).__name__}")
                found |= {str(v) for v in value if str(v) != NO_EXCLUSION}
        counts[qfile.parent.name] = len(found)
        ids |= found
    return ids, counts
