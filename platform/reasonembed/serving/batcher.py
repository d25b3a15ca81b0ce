"""Dynamic batching across requests: ``@serve.batch`` with a *token budget* ``batch_size_fn``, plus a forward
executor that merges whatever is waiting whenever the model frees up.

Level 1 — ``@serve.batch(max_batch_size=B, batch_size_fn=f)`` adds queued chunks to a batch while ``f(items) <= B``.
We set ``B = token_budget`` and ``f = rows x longest row`` (``EmbeddingEngine.chunk_cost``), so a batch holds many
short inputs or a few long ones, never more padded tokens than the budget (the row limit is folded into ``f``);
``batch_wait_timeout_s`` bounds the wait for company.

Level 2 — the model runs one forward pass at a time. Serve's batcher forms a batch every ``batch_wait_timeout_s``
whether or not the model is free (``max_concurrent_batches`` only delays *running* it), so under load it would
queue many small batches behind the busy model and throughput would stay flat as concurrency grows. The executor
therefore takes every Serve batch that is waiting when the previous pass ends and packs them into one pass, again
within the token budget: latency at low load is one small pass, throughput at high load is full-budget passes.
The pass runs in a worker thread (torch releases the GIL), so the replica keeps accepting and tokenising requests
meanwhile. Requires Ray >= 2.50 (``batch_size_fn``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

import numpy as np

from reasonembed.serving.embedding_engine import BatchStats, Chunk, EmbeddingEngine

log = logging.getLogger(__name__)


class ForwardExecutor:
    """One forward pass at a time; each pass packs every waiting Serve batch that fits the token budget."""

    def __init__(self, engine: EmbeddingEngine, on_batch: Callable[[BatchStats], None] | None = None):
        self.engine = engine
        self.on_batch = on_batch
        self.pending: deque[tuple[list[Chunk], asyncio.Future]] = deque()
        self.wakeup: asyncio.Event | None = None
        self.task: asyncio.Task | None = None

    async def submit(self, chunks: list[Chunk]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        if self.task is None:  # created lazily on the replica's user event loop
            self.wakeup = asyncio.Event()
            self.task = loop.create_task(self._run())
        fut = loop.create_future()
        self.pending.append((chunks, fut))
        self.wakeup.set()
        return await fut

    def _take(self) -> list[tuple[list[Chunk], asyncio.Future]]:
        """The oldest waiting batch plus as many following ones as fit the budget together (one pass)."""
        take = [self.pending.popleft()]
        chunks = list(take[0][0])
        while self.pending:
            nxt = self.pending[0]
            if self.engine.chunk_cost(chunks + nxt[0]) > self.engine.token_budget:
                break
            take.append(self.pending.popleft())
            chunks += nxt[0]
        return [(c, f) for c, f in take if not f.done()]  # drop requests cancelled meanwhile

    async def _run(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.pending:
                take = self._take()
                if not take:
                    continue
                flat = [c for chunks, _ in take for c in chunks]
                try:
                    parts, stats = await asyncio.to_thread(self.engine.forward, flat)
                except Exception as exc:  # a failed pass fails its requests, never the executor
                    for _, fut in take:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                start = 0
                for chunks, fut in take:
                    if not fut.done():
                        fut.set_result(parts[start:start + len(chunks)])
                    start += len(chunks)
                if self.on_batch is not None:
                    try:
                        self.on_batch(stats)
                    except Exception:  # metrics must never stop the executor: later requests would hang
                        log.exception("batch metrics callback failed")


def make_batcher(
    engine: EmbeddingEngine, on_batch: Callable[[BatchStats], None] | None = None
) -> Callable[[Chunk], Awaitable[np.ndarray]]:
    """An awaitable ``run(chunk) -> embeddings`` whose calls are packed into token-budget forward passes."""
    from ray import serve

    cfg = engine.batching
    executor = ForwardExecutor(engine, on_batch)

    @serve.batch(
        max_batch_size=engine.token_budget,
        batch_wait_timeout_s=cfg.wait_timeout_s,
        max_concurrent_batches=cfg.max_concurrent_batches,
        batch_size_fn=engine.chunk_cost,
    )
    async def run(chunks: list[Chunk]) -> list[np.ndarray]:
        return await executor.submit(chunks)

    return run
