"""The trainable bi-encoder: the platform ``Embedder``'s backbone with LoRA and gradient checkpointing, wrapped in
one ``nn.Module`` whose single forward encodes queries and passages.

Why one forward for both. DDP (and DeepSpeed) expect one forward per backward: two separate wrapped calls
(queries, then passages) that share parameters would mark each parameter ready twice. A module whose forward runs
the encoder twice is what DDP sees as one step (Tevatron does the same). The reasoning queries q′ are encoded
outside it, under ``no_grad`` and in eval mode (no dropout), with the same weights (``encode_frozen``).

Backbones: decoder LLMs (Qwen2/3, Llama, Mistral, Gemma, Phi-3: last-token pooling, left padding, EOS appended;
LoRA and gradient checkpointing by default) and BERT-style encoders (MiniLM, BERT, RoBERTa, MPNet, ...: mean
pooling, full fine-tuning). Anything else is refused with the list of supported types.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from reasonembed.config.embedder import EmbedderConfig
from reasonembed.models.embedder import Embedder
from reasonembed.models.lora import apply_lora, trainable_summary
from reasonembed.models.registry import _DECODER_TYPES, resolve_model

log = logging.getLogger(__name__)

ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "mpnet", "electra", "distilbert", "deberta-v2", "modernbert"}
DECODER_TYPES = set(_DECODER_TYPES)


class BackboneError(ValueError):
    """The backbone is of a type the trainer does not know how to pool or adapt."""


def backbone_type(model_ref: str) -> tuple[str, str]:
    """(model_type, kind) of a model reference; unknown types raise ``BackboneError``."""
    import json

    resolved = resolve_model(model_ref)
    model_type = json.loads((resolved.path / "config.json").read_text()).get("model_type", "")
    if model_type in DECODER_TYPES:
        return model_type, "decoder"
    if model_type in ENCODER_TYPES:
        return model_type, "encoder"
    raise BackboneError(
        f"unknown backbone type {model_type!r} for model {model_ref!r}: the trainer supports decoder LLMs "
        f"{sorted(DECODER_TYPES)} (last-token pooling, LoRA) and encoders {sorted(ENCODER_TYPES)} (mean pooling, "
        "full fine-tuning). Other architectures need their pooling and LoRA targets decided first."
    )


class BiEncoder(nn.Module):
    """forward(queries, passages) -> (query embeddings [B, D], passage embeddings [B·G, D]), L2-normalised."""

    def __init__(self, embedder: Embedder):
        super().__init__()
        self.embedder = embedder  # a plain object: its .model is registered below as the only submodule
        self.backbone = embedder.model

    def forward(self, queries: dict[str, torch.Tensor], passages: dict[str, torch.Tensor] | list[dict]):
        """``passages`` may be a list of padded chunks: their embeddings are concatenated in chunk order."""
        if isinstance(passages, dict):
            return self.embedder.embed_batch(queries), self.embedder.embed_batch(passages)
        return self.embedder.embed_batch(queries), torch.cat([self.embedder.embed_batch(b) for b in passages])

    @torch.no_grad()
    def encode_frozen(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings of the reasoning queries q′ for the RI weights: no autograd, and in eval mode.

        Why eval mode: RI_i = L_i(q) / L_i(q′) is a measurement of the current model, not a training signal; with
        dropout on (LoRA dropout 0.1 by default) L_i(q′) and so the weights would carry dropout noise, and the same
        batch would get different weights on every call. Every submodule's own train/eval flag is restored after,
        also when the forward raises.
        """
        modes = [(m, m.training) for m in self.backbone.modules()]
        self.backbone.eval()
        try:
            return self.embedder.embed_batch(batch)
        finally:
            for m, training in modes:
                m.training = training


@dataclass
class ModelBundle:
    """What the worker trains, and what the checkpoint fingerprint and export need to know about it."""

    embedder: Embedder
    module: BiEncoder
    info: dict[str, Any]


def build_bi_encoder(cfg, device: torch.device, precision: str) -> ModelBundle:
    """Load the backbone of ``cfg.embedder`` onto ``device`` with ``cfg.lora`` and gradient checkpointing.

    Weights load in float32 unless training is bf16 with frozen base weights (LoRA) or DeepSpeed (which keeps fp32
    master weights in its optimizer); an 8B model in fp32 would need 32 GB per worker for nothing.
    """
    model_type, kind = backbone_type(cfg.embedder.model)
    use_lora = cfg.lora.enabled if cfg.lora.enabled is not None else kind == "decoder"
    bf16_weights = precision == "bf16" and (use_lora or cfg.strategy == "deepspeed")
    emb_cfg: EmbedderConfig = cfg.embedder.model_copy(
        update={"device": str(device), "dtype": "bfloat16" if bf16_weights else "float32"}
    )
    embedder = Embedder(emb_cfg)
    model = embedder.model
    use_gc = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else kind == "decoder"
    if use_gc:
        # Non-reentrant checkpointing: works under DDP with parameters used twice per forward (queries and
        # passages) and needs no input-gradient hook for frozen embeddings.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if use_lora:
        model = apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules,
                           embedder.resolved.name)
        embedder.model = model
    model.train()
    counts = trainable_summary(model)
    if counts["trainable_params"] == 0:
        raise BackboneError(f"model {cfg.embedder.model!r} has no trainable parameters after set-up")
    info = {
        "name": embedder.resolved.name,
        "ref": cfg.embedder.model,
        "path": str(embedder.resolved.path),
        "model_type": model_type,
        "kind": kind,
        "hidden_size": embedder.dim,
        "pooling": embedder.pooling,
        "max_length": embedder.max_length,
        "append_eos": embedder.append_eos,
        "normalize": emb_cfg.normalize,
        "lora": use_lora,
        "gradient_checkpointing": use_gc,
        "precision": precision,
        "weights_dtype": str(emb_cfg.dtype),
        **counts,
    }
    log.info("backbone %s (%s, %s pooling): %d of %d parameters trainable%s%s", info["name"], kind,
             embedder.pooling, counts["trainable_params"], counts["total_params"], ", LoRA" if use_lora else "",
             ", gradient checkpointing" if use_gc else "")
    return ModelBundle(embedder, BiEncoder(embedder), info)
