"""A cheap, content-based fingerprint of a local model folder, for stage manifests.

Hashing every byte of a multi-GB checkpoint on each stage start would cost seconds to minutes, so the fingerprint
covers what changes whenever the weights change: the config file(s) in full, the relative path and size of every
weight file, and the first and last MiB of each weight file (a safetensors file starts with its JSON header, which
lists every tensor's name, dtype, shape and offsets). Copies of a folder fingerprint the same (no paths outside the
folder, no modification times); editing, adding, removing or renaming a weight file changes the fingerprint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# Files whose bytes are hashed in full when present at the top of the folder.
CONFIG_FILES = ("config.json", "adapter_config.json")
# Suffixes of weight files (Hugging Face, PyTorch, GGUF, ONNX, Flax/TF checkpoints).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".ckpt", ".h5", ".msgpack")
_MIB = 1 << 20
_VERSION = b"reasonembed-model-fingerprint-v1\0"


def _weight_files(folder: Path) -> list[Path]:
    """Weight files anywhere below ``folder``, skipping hidden files and folders (``.cache``, ``.git``, temp builds)."""
    found = []
    for f in folder.rglob("*"):
        rel = f.relative_to(folder)
        if f.suffix in WEIGHT_SUFFIXES and f.is_file() and not any(p.startswith(".") for p in rel.parts):
            found.append(f)
    return sorted(found, key=lambda f: f.relative_to(folder).as_posix())


def _hash_file_ends(h, f: Path, size: int) -> None:
    with open(f, "rb") as fh:
        h.update(fh.read(_MIB))
        if size > _MIB:
            fh.seek(max(_MIB, size - _MIB))
            h.update(fh.read(_MIB))


def model_fingerprint(path: Path | str) -> str:
    """sha256 hex digest (64 chars) identifying the weights of the model folder (or single weight file) ``path``.

    Raises FileNotFoundError when ``path`` does not exist or holds neither a config file nor a weight file.
    """
    p = Path(path).expanduser()
    if p.is_file():
        folder, files = p.parent, [p]
    elif p.is_dir():
        folder, files = p, _weight_files(p)
    else:
        raise FileNotFoundError(f"model folder does not exist: {p}")
    h = hashlib.sha256(_VERSION)
    configs = [name for name in CONFIG_FILES if p.is_dir() and (p / name).is_file()]
    if not configs and not files:
        raise FileNotFoundError(f"no config.json or weight files ({', '.join(WEIGHT_SUFFIXES)}) in {p}")
    for name in configs:
        data = (p / name).read_bytes()
        h.update(f"config\0{name}\0{len(data)}\0".encode())
        h.update(data)
    for f in files:
        size = f.stat().st_size
        h.update(f"weights\0{f.relative_to(folder).as_posix()}\0{size}\0".encode())
        _hash_file_ends(h, f, size)
    return h.hexdigest()
