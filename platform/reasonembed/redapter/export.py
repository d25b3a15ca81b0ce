"""Export a trained backbone as a Hugging Face folder that ``SentenceTransformer(path)`` loads as is.

What the folder records, so that sentence-transformers embeds exactly like the platform's ``Embedder``:

- the (LoRA-merged) weights and the tokenizer (``save_pretrained``);
- ``modules.json`` = Transformer -> Pooling -> Normalize (the long-standing format that sentence-transformers 2.x
  to 6.x and ``reasonembed.models.registry`` all read), ``sentence_bert_config.json`` with ``max_seq_length``
  (also the tokenizer's ``model_max_length``), ``1_Pooling/config.json`` with the pooling mode;
- last-token pooling: the tokenizer pads on the left and appends EOS through its post-processor, the same
  ``[tokens…, EOS]`` the platform builds (Qwen3-Embedding ships its tokenizer the same way);
- ``config_sentence_transformers.json`` with ``prompts = {"query": "Instruct: {task}\\nQuery: ", "document": ""}``
  (plus one prompt per training domain), so ``model.encode(q, prompt_name="query")`` formats queries as
  ``Instruct: {task}\\nQuery: {q}`` (docs/training.md) and documents get no instruction;
- ``reasonembed.json``: base model, pooling, query format, training run and step.

Usage::

    fmt = SentenceFormat(pooling="last_token", normalize=True, max_length=512, append_eos=True,
                         prompts={"query": "Instruct: ...\\nQuery: "})
    path = export_model(merged(model).to(torch.bfloat16), tokenizer, "runs/r1/model", fmt)
    SentenceTransformer(path).encode(["q"], prompt_name="query")
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from reasonembed.config.base import StorageConfig
from reasonembed.storage import Location, is_s3

_POOLING_FLAGS = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
_MODE = {"mean": "mean_tokens", "cls": "cls_token", "last_token": "lasttoken"}


@dataclass(frozen=True)
class SentenceFormat:
    """How the platform ``Embedder`` embedded in training, which the exported folder must reproduce."""

    pooling: str  # "mean", "cls" or "last_token"
    normalize: bool
    max_length: int
    append_eos: bool  # last-token pooling reads the EOS appended to every input
    prompts: dict[str, str]  # sentence-transformers prompts (see :func:`st_prompts`)


def prompt_prefix(query_format: str, instruction: str) -> str:
    """The text sentence-transformers prepends to a query: the format with ``{query}`` cut off."""
    if not query_format.endswith("{query}"):
        raise ValueError(f"query_format {query_format!r} must end with '{{query}}' to be stored as a prompt")
    return query_format[: -len("{query}")].format(task=instruction)


def st_prompts(query_format: str, instruction: str | None, per_domain: dict[str, str] | None = None) -> dict[str, str]:
    """{"query": prefix, "document": "", "<domain>": prefix of that domain's instruction, ...}."""
    prompts: dict[str, str] = {"document": ""}
    for domain, task in sorted((per_domain or {}).items()):
        if task and domain not in ("query", "document"):
            prompts[domain] = prompt_prefix(query_format, task)
    prompts["query"] = prompt_prefix(query_format, instruction) if instruction else ""
    return prompts


def _eos_post_processor(eos: str, eos_id: int) -> dict[str, Any]:
    seq = {"Sequence": {"id": "A", "type_id": 0}}
    seq_b = {"Sequence": {"id": "B", "type_id": 0}}
    tok = {"SpecialToken": {"id": eos, "type_id": 0}}
    return {"type": "TemplateProcessing", "single": [seq, tok], "pair": [seq, tok, seq_b, tok],
            "special_tokens": {eos: {"id": eos, "ids": [eos_id], "tokens": [eos]}}}


def _write_tokenizer(tokenizer, folder: Path, pooling: str, max_length: int, append_eos: bool) -> None:
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # Last-token pooling reads position -1: pad on the left (save_pretrained does not keep padding_side).
    cfg["padding_side"] = "left" if pooling == "last_token" else "right"
    cfg["model_max_length"] = max_length
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    if not append_eos:
        return
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise ValueError(
            "append_eos needs a fast tokenizer (tokenizer.json) to record the EOS post-processor; this backbone's "
            "tokenizer has none, so sentence-transformers could not reproduce the training-time inputs"
        )
    spec = json.loads(tok_path.read_text())
    spec["post_processor"] = _eos_post_processor(tokenizer.eos_token, int(tokenizer.eos_token_id))
    tok_path.write_text(json.dumps(spec, ensure_ascii=False))


def _write_st_files(folder: Path, dim: int, fmt: SentenceFormat) -> None:
    pooling, normalize, max_length, prompts = fmt.pooling, fmt.normalize, fmt.max_length, fmt.prompts
    if pooling not in _MODE:
        raise ValueError(f"pooling {pooling!r} has no sentence-transformers equivalent ({sorted(_MODE)})")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        # A file, not just a folder: object stores (s3://) have no empty folders.
        (folder / "2_Normalize").mkdir(exist_ok=True)
        (folder / "2_Normalize" / "config.json").write_text("{}\n")
    (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_length, "do_lower_case": False}, indent=2) + "\n"
    )
    pool = {"word_embedding_dimension": dim}
    pool.update({f"pooling_mode_{flag}": flag == _MODE[pooling] for flag in _POOLING_FLAGS})
    # The instruction is part of the text the model saw in training, so it is pooled too (platform Embedder).
    pool["include_prompt"] = True
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pool, indent=2) + "\n")
    versions = {}
    for pkg in ("sentence-transformers", "transformers", "torch"):
        try:
            versions[pkg.replace("-", "_") if pkg != "torch" else "pytorch"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    (folder / "config_sentence_transformers.json").write_text(json.dumps({
        "__version__": versions,
        "prompts": prompts,
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if normalize else "dot",
    }, indent=2, ensure_ascii=False) + "\n")


def export_model(
    model: torch.nn.Module,
    tokenizer,
    out: str,
    fmt: SentenceFormat,
    *,
    info: dict[str, Any] | None = None,
    adapter: str | Path | None = None,
    storage: StorageConfig | None = None,
) -> str:
    """Write the folder described in the module docstring to ``out`` (local or s3://); returns ``out``.

    Args:
        model: the plain (merged) backbone, e.g. ``AutoModel`` output, in the dtype to store; saved with
            ``save_pretrained``.
        tokenizer: its tokenizer.
        fmt: what the platform ``Embedder`` used in training (pooling, normalisation, max length, EOS, prompts).
        info: extra provenance stored in ``reasonembed.json``.
        adapter: a saved peft adapter folder, copied to ``adapter/`` (kept next to the merged weights).
    A local target is replaced atomically (written next to it, then renamed), so a reader never sees half a model.
    """
    work = Path(tempfile.mkdtemp(prefix="reasonembed-export-"))
    try:
        model.save_pretrained(work, safe_serialization=True)
        if adapter is not None:
            shutil.copytree(adapter, work / "adapter")
        _write_tokenizer(tokenizer, work, fmt.pooling, fmt.max_length, fmt.append_eos)
        dim = int(model.config.hidden_size)
        _write_st_files(work, dim, fmt)
        meta = {"pooling": fmt.pooling, "normalize": fmt.normalize, "max_length": fmt.max_length,
                "append_eos": fmt.append_eos, "prompts": fmt.prompts, "dim": dim, **(info or {})}
        (work / "reasonembed.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        _publish(work, out, storage)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _publish(work: Path, out: str, storage: StorageConfig | None) -> None:
    if is_s3(out):
        loc = Location(out, storage)
        for f in sorted(p for p in work.rglob("*") if p.is_file()):
            loc.upload_file(f, f.relative_to(work).as_posix())
        return
    target = Path(out).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}"
    shutil.copytree(work, staging)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old.{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
