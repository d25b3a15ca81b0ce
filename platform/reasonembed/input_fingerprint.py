"""Fingerprints of a stage's inputs, so a resumed or reused stage is refused when what it read has changed.

A stage's config hash says *how* rows are made; these say *from what*. Three kinds of input:

- data files (local or ``s3://``): size, modification time and the sha256 of a bounded sample (the first and last
  MiB), so a multi-GB corpus costs two reads and a stat, and any edit that changes the size, the mtime, the head or
  the tail is caught;
- model folders: :func:`reasonembed.models.fingerprint.model_fingerprint` (config + weight headers);
- an upstream stage: the identity of its manifest (:meth:`reasonembed.storage.StageDir.output_fingerprint`), which
  changes whenever the upstream stage is redone.

Each is a short string; a stage records ``{input name: fingerprint}`` in its ``_stage.json`` marker and manifest, and
:meth:`reasonembed.storage.StageDir.begin` compares them (see :func:`describe_changes`).
"""

from __future__ import annotations

import hashlib

import pyarrow.fs as pafs

from reasonembed.config.base import StorageConfig

_SAMPLE = 1 << 20  # bytes hashed at each end of a file


def file_fingerprint(uri: str, storage: StorageConfig | None = None) -> str:
    """``size:<bytes>;mtime:<ns>;sample:<sha256 of head+tail>`` of one local or S3 file (FileNotFoundError if absent)."""
    from reasonembed.storage import resolve

    fs, path = resolve(uri, storage)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input file not found: {uri}")
    size = info.size or 0
    mtime = info.mtime_ns or 0
    h = hashlib.sha256()
    with fs.open_input_file(path) as fh:
        h.update(fh.read(min(size, _SAMPLE)))
        if size > _SAMPLE:
            fh.seek(max(_SAMPLE, size - _SAMPLE))
            h.update(fh.read())
    return f"size:{size};mtime:{mtime};sample:{h.hexdigest()[:16]}"


def files_fingerprint(uris: list[str], storage: StorageConfig | None = None) -> dict[str, str]:
    """``{uri: file_fingerprint(uri)}`` for every file a stage reads."""
    return {str(u): file_fingerprint(str(u), storage) for u in uris}


def model_input(reference: str) -> dict[str, str]:
    """``{"model:<reference>": fingerprint}`` for a model that resolves to a local folder; ``{}`` for a hub id that is
    not on disk (its revision is the user's to pin)."""
    from reasonembed.models.fingerprint import model_fingerprint
    from reasonembed.models.registry import resolve_model

    try:
        path = resolve_model(reference).path
        return {f"model:{reference}": model_fingerprint(path)}
    except Exception:  # not resolvable offline, or no weights on disk: nothing local to fingerprint
        return {}


def describe_changes(before: dict[str, str], now: dict[str, str]) -> list[str]:
    """Human-readable differences between two input maps, e.g. ``changed: corpus.jsonl (size:10 -> size:12 ...)``."""
    out = []
    for name in sorted(set(before) | set(now)):
        if name not in now:
            out.append(f"no longer an input: {name}")
        elif name not in before:
            out.append(f"new input: {name}")
        elif before[name] != now[name]:
            out.append(f"changed: {name} ({before[name]} -> {now[name]})")
    return out
