"""The platform's one embedding code path: training, batch encoding, evaluation, mining and serving all use it.

Pooling (h = last hidden states, m = attention mask, L = sequence length):
- ``mean``: e = Σ_t m_t h_t / Σ_t m_t (sentence-transformers' default for encoders such as MiniLM);
- ``cls``: e = h_0;
- ``last_token``: e = h_{L-1} with *left* padding and an EOS token appended, so the last position is always the
  final real token (decoder LLMs; ReasonEmbed, arXiv 2510.08252, section 4; gte-Qwen2; Qwen3-Embedding).
Embeddings are L2-normalised (e / ||e||) unless disabled. Queries are formatted ``Instruct: {task}\nQuery: {q}``;
documents get no instruction.

Batches are cut by a *token budget* over length-sorted inputs rather than a fixed row count: the padded size of a
batch is rows × longest row, so sorting makes padding waste small and lets short texts run in large batches.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from reasonembed.config.embedder import EmbedderConfig
from reasonembed.models.registry import ResolvedModel, resolve_model

log = logging.getLogger(__name__)

# Encoder families whose AutoModel adds a pooler head we never use (DDP then complains about unused parameters).
_POOLER_FAMILIES = {"bert", "roberta", "xlm-roberta", "mpnet", "electra"}


@dataclass
class EncodeResult:
    """Embeddings plus what it took to make them."""

    embeddings: np.ndarray  # float32 [N, D]
    n_tokens: int  # real (unpadded) tokens fed to the model
    n_padded_tokens: int  # tokens including padding
    n_truncated: int  # inputs cut to max_length
    n_batches: int


def budget_batches(lengths: Sequence[int], token_budget: int, max_batch_size: int,
                   min_fill: float = 0.0) -> list[list[int]]:
    """Cut indices into batches whose padded size (rows × longest) stays within ``token_budget``.

    Indices are sorted by length, longest first, so the first row of each batch sets its padded width. A single row
    longer than the budget still forms its own batch (it is never dropped). ``min_fill`` > 0 also starts a new batch
    at a row shorter than ``min_fill × width``: every row then fills at least that fraction of its padded width.
    Why: a mixed batch (one 256-token document among short queries) would pad every query to 256 tokens; two passes
    cost a fraction of that. Large sorted corpora rarely trigger it; mixed online traffic does.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        w = width if current else lengths[i]
        if current and ((len(current) + 1) * w > token_budget or len(current) >= max_batch_size
                        or lengths[i] < min_fill * w):
            batches.append(current)
            current, w = [], lengths[i]
        current.append(i)
        width = w
    if current:
        batches.append(current)
    return batches


def pick_device(device: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` means bfloat16 on CUDA and float32 on CPU (this CPU has no bf16 units; fp32 is exact and fastest)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class Embedder:
    """Embed texts with any Hugging Face backbone.

    Args:
        cfg: the embedder config (model reference, pooling, max length, instruction, token budget, device).
        model: optional already-loaded ``transformers`` model (e.g. a peft-wrapped one during training).

    Example:
        >>> emb = Embedder(EmbedderConfig(model="minilm"))
        >>> emb.encode(["a cat", "a dog"]).shape
        (2, 384)
    """

    def __init__(self, cfg: EmbedderConfig, model: torch.nn.Module | None = None):
        self.cfg = cfg
        model_given = model
        self.resolved: ResolvedModel = resolve_model(cfg.model)
        self.pooling = cfg.pooling or self.resolved.pooling
        self.max_length = cfg.max_length or self.resolved.max_length
        self.append_eos = cfg.append_eos if cfg.append_eos is not None else self.pooling == "last_token"
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        if cfg.num_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.num_threads)

        path = str(self.resolved.path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Last-token pooling reads position -1, which must be a real token: pad on the left.
        self.tokenizer.padding_side = "left" if self.pooling == "last_token" else "right"
        if self.append_eos and self.tokenizer.eos_token_id is None:
            raise ValueError(f"model {cfg.model!r} has no EOS token but append_eos is on")
        self.tokenizer_appends_eos = self.append_eos and self._tokenizer_appends_eos()
        if model is None:
            kwargs = {"dtype": self.dtype}
            family = getattr(self._hf_config(path), "model_type", "")
            if family in _POOLER_FAMILIES:
                kwargs["add_pooling_layer"] = False
            model = AutoModel.from_pretrained(path, **kwargs)
            model.to(self.device).eval()
        self.model = model
        self.dim = int(self.model.config.hidden_size)
        use_onnx = cfg.backend.startswith("onnx")
        self.onnx = self._onnx_session(path) if use_onnx and model_given is None else None
        if use_onnx and model_given is not None:
            log.warning("backend=%r runs the weights in %s, not a model passed in memory: using torch", cfg.backend, path)

    def with_max_length(self, max_length: int) -> Embedder:
        """This embedder at another max length, sharing the loaded model, tokenizer and ONNX session.

        Why: a benchmark may fix its own input length (R2MED: 512) while one evaluation covers several benchmarks;
        loading the weights again per length would cost an 8B model's load time and memory for nothing.
        """
        if max_length == self.max_length:
            return self
        other = copy.copy(self)
        other.cfg = self.cfg.model_copy(update={"max_length": max_length})
        other.max_length = max_length
        return other

    def _onnx_session(self, path: str):
        """ONNX Runtime session over the cached graph of ``path`` (exported on first use; int8 only for onnx-int8)."""
        from reasonembed.models.onnx_runtime import OnnxEncoder, ensure_onnx

        if self.device.type != "cpu" or self.dtype != torch.float32:
            raise ValueError(f"backend={self.cfg.backend!r} runs on the CPU with float32 activations; got "
                             f"device={self.device}, dtype={self.dtype}")
        graph = ensure_onnx(path, precision="int8" if self.cfg.backend == "onnx-int8" else "fp32")
        return OnnxEncoder(graph, num_threads=self.cfg.num_threads or torch.get_num_threads())

    def _tokenizer_appends_eos(self) -> bool:
        """Whether the tokenizer's own post-processor ends every input with EOS (exported models, Qwen3-Embedding).

        Such a tokenizer keeps its EOS when it truncates, so the cut must be made at ``max_length`` (as
        sentence-transformers does), not one token earlier to leave room for an EOS we would append ourselves.
        """
        eos = self.tokenizer.eos_token_id
        with_special = self.tokenizer("a", add_special_tokens=True, verbose=False)["input_ids"]
        plain = self.tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
        return bool(with_special) and with_special[-1] == eos and (not plain or plain[-1] != eos)

    @staticmethod
    def _hf_config(path: str):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path)

    # ---- text formatting -------------------------------------------------------------------------------------
    def format_queries(self, texts: Sequence[str], instruction: str | None = None) -> list[str]:
        """Apply the query template when an instruction is given (argument or config); else return texts as is."""
        task = instruction if instruction is not None else self.cfg.query_instruction
        if not task:
            return list(texts)
        return [self.cfg.query_format.format(task=task, query=q) for q in texts]

    # ---- tokenisation ------------------------------------------------------------------------------------------
    def token_ids(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        """Token ids per text, truncated to ``max_length`` (EOS included when appended), and the truncated count."""
        ids, flags = self.token_ids_with_flags(texts)
        return ids, sum(flags)

    def token_ids_with_flags(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids per text and, per text, whether it was truncated.

        Texts are tokenised once in full to know their true length; only the over-long ones are tokenised again
        with truncation, so the count of cut inputs is exact. Every input ends up at most ``max_length`` tokens,
        EOS included: when we append the EOS, the tokenizer cuts one token earlier to leave room for it; when the
        tokenizer appends it itself, its truncation already keeps it within ``max_length``. Either way a cut input
        is the ``max_length - 1`` first tokens plus EOS, the same ids sentence-transformers builds from an exported
        model (whose tokenizer appends EOS) at ``max_seq_length``.
        """
        limit = self.max_length - (1 if self.append_eos and not self.tokenizer_appends_eos else 0)
        ids = self.tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        long_idx = [i for i, x in enumerate(ids) if len(x) > limit]
        if long_idx:
            cut = self.tokenizer(
                [texts[i] for i in long_idx], add_special_tokens=True, truncation=True, max_length=limit
            )["input_ids"]
            for i, x in zip(long_idx, cut, strict=True):
                ids[i] = x
        if self.append_eos:
            eos = self.tokenizer.eos_token_id
            ids = [x if x and x[-1] == eos else x + [eos] for x in ids]
        flags = [False] * len(ids)
        for i in long_idx:
            flags[i] = True
        return ids, flags

    def pad(self, ids: Sequence[Sequence[int]]):
        """Pad token ids into a tensor batch on the model's device (side chosen by pooling)."""
        enc = self.tokenizer.pad({"input_ids": [list(x) for x in ids]}, padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def tokenize(self, texts: Sequence[str]):
        """Tokenise, truncate and pad one batch (the training path)."""
        ids, _ = self.token_ids(texts)
        return self.pad(ids)

    # ---- forward -----------------------------------------------------------------------------------------------
    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pool token states [B, L, D] into [B, D] (see module docstring for the formulas)."""
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "last_token":
            # Left padding puts every sequence's final token at -1; fall back to gathering for right padding.
            if bool(mask[:, -1].all()):
                return hidden[:, -1]
            last = mask.sum(1) - 1
            return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
        raise ValueError(f"unknown pooling {self.pooling!r}")

    def embed_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled (and normalised) embeddings of a padded batch, with autograd (used by training)."""
        out = self.model(**batch)
        emb = self.pool(out.last_hidden_state, batch["attention_mask"])
        if self.cfg.normalize:
            emb = torch.nn.functional.normalize(emb.float(), p=2, dim=-1)
        return emb

    def _infer(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inference forward: the ONNX Runtime graph when backend='onnx' (same pooling code), else torch."""
        if self.onnx is None:
            return self.embed_batch(batch)
        mask = batch["attention_mask"]
        hidden = torch.from_numpy(self.onnx.last_hidden_state(batch["input_ids"].numpy(), mask.numpy()))
        emb = self.pool(hidden, mask)
        return torch.nn.functional.normalize(emb, p=2, dim=-1) if self.cfg.normalize else emb

    def iter_batches(self, ids: Sequence[Sequence[int]], min_fill: float = 0.0) -> Iterator[list[int]]:
        """Token-budget batches over length-sorted inputs (indices into ``ids``); see ``budget_batches``."""
        yield from budget_batches([len(x) for x in ids], self.cfg.token_budget, self.cfg.max_batch_size, min_fill)

    @torch.inference_mode()
    def encode_ids(self, ids: Sequence[Sequence[int]], min_fill: float = 0.0) -> EncodeResult:
        """Embed pre-tokenised inputs; rows come back in input order."""
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        n_tok = n_pad = n_batches = 0
        for batch in self.iter_batches(ids, min_fill):
            enc = self.pad([ids[i] for i in batch])
            out[batch] = self._infer(enc).float().cpu().numpy()
            n_tok += int(enc["attention_mask"].sum())
            n_pad += int(enc["attention_mask"].numel())
            n_batches += 1
        return EncodeResult(out, n_tok, n_pad, 0, n_batches)

    def encode_with_stats(
        self, texts: Sequence[str], is_query: bool = False, instruction: str | None = None
    ) -> EncodeResult:
        """Embed texts (queries get the instruction template) and report tokens and truncation."""
        if is_query:
            texts = self.format_queries(texts, instruction)
        ids, n_trunc = self.token_ids(texts)
        res = self.encode_ids(ids)
        res.n_truncated = n_trunc
        return res

    def encode(self, texts: Sequence[str], is_query: bool = False, instruction: str | None = None) -> np.ndarray:
        """Embed texts; float32 [N, D], rows in input order."""
        return self.encode_with_stats(texts, is_query=is_query, instruction=instruction).embeddings

    def describe(self) -> dict:
        """What a consumer of these embeddings must know to match them (recorded in index manifests)."""
        return {
            "model": self.cfg.model,
            "model_name": self.resolved.name,
            "pooling": self.pooling,
            "normalize": self.cfg.normalize,
            "max_length": self.max_length,
            "append_eos": self.append_eos,
            "query_format": self.cfg.query_format,
            "query_instruction": self.cfg.query_instruction,
            "dim": self.dim,
        }
