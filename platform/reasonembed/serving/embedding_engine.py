"""The model side of serving: inputs -> token ids (with the truncation policy) -> token-budget chunks -> embeddings.

Every text goes through the platform's one embedding path (``Embedder.format_queries`` + ``token_ids_with_flags`` +
``encode_ids``), so a served embedding equals the batch-encode embedding of the same text (up to float noise from
a different batch composition).

Token budget. A request's inputs are cut into *chunks* by ``budget_batches`` over their token lengths, each chunk
with ``rows x longest <= token_budget`` and ``rows <= max_batch_size``. Serve's dynamic batcher and the forward
executor then pack chunks of concurrent requests into one forward pass while the packed ``rows x longest`` stays
within the same budget (``chunk_cost``, see ``batcher.py``), so a pass never exceeds the budget whatever mix of
short and long inputs arrives.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from reasonembed.config.embedder import EmbedderConfig
from reasonembed.config.serve import BatchingConfig
from reasonembed.models.embedder import Embedder, budget_batches
from reasonembed.serving.errors import ContextLengthExceeded, InvalidRequest

log = logging.getLogger(__name__)
# Requests with more characters than this are tokenised in a worker thread so the replica's event loop keeps
# forming batches meanwhile.
THREADED_TOKENIZE_CHARS = 50_000


@dataclass
class EmbedCall:
    """One embedding request as the model replica sees it (HTTP-free; also sent by batch jobs)."""

    texts: list[str] | None = None
    ids: list[list[int]] | None = None
    is_query: bool = False
    instruction: str | None = None  # None with is_query: the embedder's configured query instruction
    truncate: bool = True

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.ids or [])

    def n_chars(self) -> int:
        return sum(len(t) for t in self.texts) if self.texts is not None else sum(len(x) for x in self.ids or [])


@dataclass
class EmbedReply:
    """Embeddings in input order plus per-input token counts and truncation flags."""

    embeddings: np.ndarray  # float32 [N, D]
    n_tokens: list[int]
    truncated: list[bool]

    @property
    def total_tokens(self) -> int:
        return int(sum(self.n_tokens))


@dataclass
class Chunk:
    """A slice of one request that fits the token budget on its own; the unit Serve's batcher packs."""

    ids: list[list[int]]
    width: int = 0  # longest row

    def __post_init__(self) -> None:
        self.width = max((len(x) for x in self.ids), default=0)


@dataclass
class BatchStats:
    """What one forward pass did (for metrics)."""

    rows: int
    tokens: int
    padded_tokens: int
    seconds: float


@dataclass
class EngineStatus:
    ready: bool = False
    warmup_s: float = 0.0
    warmup_lengths: list[int] = field(default_factory=list)


class EmbeddingEngine:
    """Tokenise with the serving policies and embed token-budget batches with an ``Embedder``.

    Args:
        embedder_cfg: the served model.
        batching: batch limits; ``token_budget`` None means ``embedder_cfg.token_budget``.
        embedder: an already-built Embedder (tests share one); built from ``embedder_cfg`` when None.
    """

    def __init__(self, embedder_cfg: EmbedderConfig, batching: BatchingConfig | None = None,
                 embedder: Embedder | None = None):
        self.batching = batching or BatchingConfig()
        self.embedder = embedder or Embedder(embedder_cfg)
        self.token_budget = self.batching.token_budget or self.embedder.cfg.token_budget
        self.max_rows = self.batching.max_batch_size
        if self.token_budget < self.embedder.max_length:
            raise ValueError(
                f"batching.token_budget {self.token_budget} < model max length {self.embedder.max_length}: "
                "one full-length input would never fit a batch; raise the budget"
            )
        tok = self.embedder.tokenizer
        self.eos_id = tok.eos_token_id if self.embedder.append_eos else None
        self.special_ids = set(tok.all_special_ids)
        self.vocab_rows = int(self.embedder.model.get_input_embeddings().num_embeddings)
        self.status = EngineStatus()
        # The Rust tokenizer refuses concurrent use from two threads ("Already borrowed"): serialise it.
        self._tok_lock = threading.Lock()

    # ---- inputs ----------------------------------------------------------------------------------------------
    def prepare(self, call: EmbedCall) -> tuple[list[list[int]], list[bool]]:
        """Token ids per input and whether each was cut; raises ContextLengthExceeded when truncation is off."""
        if call.texts is not None:
            return self._prepare_texts(call)
        if call.ids is not None:
            return self._prepare_ids(call.ids, call.truncate)
        raise InvalidRequest("no input given", param="input")

    def _prepare_texts(self, call: EmbedCall) -> tuple[list[list[int]], list[bool]]:
        texts = self.embedder.format_queries(call.texts, call.instruction) if call.is_query else list(call.texts)
        with self._tok_lock:
            ids, flags = self.embedder.token_ids_with_flags(texts)
            if not call.truncate and any(flags):
                i = flags.index(True)
                full = len(self.embedder.tokenizer(texts[i], add_special_tokens=True, verbose=False)["input_ids"])
                raise ContextLengthExceeded(
                    f"input[{i}] has {full + self._eos_to_add} tokens"
                    f"{' with its instruction' if call.is_query and texts[i] != call.texts[i] else ''}, more than "
                    f"the model's max length {self.embedder.max_length}; shorten it or send truncate=true",
                    param=f"input[{i}]",
                )
        return ids, flags

    @property
    def _eos_to_add(self) -> int:
        """1 when last-token pooling appends an EOS the tokenizer did not add itself (exported decoders add it)."""
        return int(self.eos_id is not None and not self.embedder.tokenizer_appends_eos)

    def _prepare_ids(self, rows: Sequence[Sequence[int]], truncate: bool) -> tuple[list[list[int]], list[bool]]:
        """Token-id inputs are used as given (include the special tokens the model's tokenizer adds); with
        last-token pooling an EOS is appended when missing, as for texts. Truncation keeps a trailing special
        token (e.g. [SEP]), matching how the tokenizer truncates texts."""
        max_len = self.embedder.max_length
        out, flags = [], []
        for i, row in enumerate(rows):
            if len(row) == 0:
                raise InvalidRequest(f"input[{i}] is an empty token list", param=f"input[{i}]")
            for j, t in enumerate(row):
                if not 0 <= t < self.vocab_rows:
                    raise InvalidRequest(
                        f"input[{i}][{j}] = {t} is not a token id of this model (0 <= id < {self.vocab_rows})",
                        param=f"input[{i}][{j}]",
                    )
            body = list(row)
            if self.eos_id is not None and body[-1] == self.eos_id:
                body = body[:-1]
            limit = max_len - (1 if self.eos_id is not None else 0)
            cut = len(body) > limit
            if cut:
                if not truncate:
                    raise ContextLengthExceeded(
                        f"input[{i}] has {len(row)} tokens, more than the model's max length {max_len}; shorten it "
                        "or send truncate=true",
                        param=f"input[{i}]",
                    )
                body = body[: limit - 1] + [body[-1]] if body[-1] in self.special_ids else body[:limit]
            if self.eos_id is not None:
                body.append(self.eos_id)
            out.append(body)
            flags.append(cut)
        return out, flags

    def plan(self, ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """Indices of ``ids`` cut into chunks that each fit the token budget and the row limit."""
        return budget_batches([len(x) for x in ids], self.token_budget, self.max_rows)

    def chunk_cost(self, chunks: Sequence[Chunk]) -> int:
        """Padded size of packing ``chunks`` into one forward pass (rows x longest); over the row limit the cost is
        made larger than the budget so Serve's batcher closes the batch."""
        rows = sum(len(c.ids) for c in chunks)
        if rows > self.max_rows:
            return self.token_budget + 1
        return rows * max((c.width for c in chunks), default=0)

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, chunks: Sequence[Chunk]) -> tuple[list[np.ndarray], BatchStats]:
        """Embed a packed batch of chunks (length-sorted sub-batches, ``batching.min_fill``); one array per chunk."""
        t0 = time.perf_counter()
        flat = [x for c in chunks for x in c.ids]
        res = self.embedder.encode_ids(flat, self.batching.min_fill)
        out, start = [], 0
        for c in chunks:
            out.append(res.embeddings[start:start + len(c.ids)])
            start += len(c.ids)
        return out, BatchStats(len(flat), res.n_tokens, res.n_padded_tokens, time.perf_counter() - t0)

    def embed(self, call: EmbedCall) -> EmbedReply:
        """Synchronous prepare -> plan -> forward (no Serve batching across requests)."""
        ids, flags = self.prepare(call)
        plan = self.plan(ids)
        return self.assemble(ids, flags, plan, self.forward_chunks(ids, plan))

    def forward_chunks(self, ids: Sequence[Sequence[int]], plan: list[list[int]]) -> list[np.ndarray]:
        chunks = [Chunk([list(ids[i]) for i in idx]) for idx in plan]
        return self.forward(chunks)[0] if chunks else []

    def assemble(self, ids: Sequence[Sequence[int]], flags: list[bool], plan: list[list[int]],
                 parts: Sequence[np.ndarray]) -> EmbedReply:
        """Put chunk results back in input order."""
        emb = np.zeros((len(ids), self.embedder.dim), dtype=np.float32)
        for idx, part in zip(plan, parts, strict=True):
            emb[idx] = part
        return EmbedReply(emb, [len(x) for x in ids], list(flags))

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def warmup(self) -> EngineStatus:
        """Run forward passes at short, medium and full length so first requests do not pay for lazy init
        (allocator growth, kernel selection); the replica reports ready only after this."""
        t0 = time.perf_counter()
        lengths = sorted({8, min(64, self.embedder.max_length), self.embedder.max_length})
        if self.batching.warmup:
            filler = next(i for i in range(self.vocab_rows // 2, self.vocab_rows) if i not in self.special_ids)
            for n in lengths:
                rows = max(1, min(self.max_rows, self.token_budget // n, 8))
                self.forward([Chunk([[filler] * n for _ in range(rows)])])
        self.status = EngineStatus(True, round(time.perf_counter() - t0, 3),
                                   lengths if self.batching.warmup else [])
        log.info("embedding engine warm in %.2f s (lengths %s)", self.status.warmup_s, self.status.warmup_lengths)
        return self.status

    def describe(self) -> dict:
        return {**self.embedder.describe(), "token_budget": self.token_budget, "max_batch_size": self.max_rows}
