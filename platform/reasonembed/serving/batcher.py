"""Dynamic batching across requests with Serve's ``@serve.batch`` and a *token budget* ``batch_size_fn``.

``@serve.batch(max_batch_size=B, batch_size_fn=f)`` adds queued items to a batch while ``f(items) <= B``. We set
``B = token_budget`` and ``f = rows x longest row`` over the queued chunks (``EmbeddingEngine.chunk_cost``), so a
batch holds many short inputs or a few long ones, never more padded tokens than the budget; the row limit is
folded into ``f`` (over it, ``f`` exceeds the budget). ``batch_wait_timeout_s`` bounds the wait for company.
The forward pass runs in a worker thread (torch releases the GIL) so the replica keeps accepting and tokenising
requests, and forms the next batch, while the current one runs. Requires Ray >= 2.50 (``batch_size_fn``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np

from reasonembed.serving.engine import BatchStats, Chunk, EmbeddingEngine


def make_batcher(
    engine: EmbeddingEngine, on_batch: Callable[[BatchStats], None] | None = None
) -> Callable[[Chunk], Awaitable[np.ndarray]]:
    """An awaitable ``run(chunk) -> embeddings`` whose calls are packed into token-budget batches."""
    from ray import serve

    cfg = engine.batching

    @serve.batch(
        max_batch_size=engine.token_budget,
        batch_wait_timeout_s=cfg.wait_timeout_s,
        max_concurrent_batches=cfg.max_concurrent_batches,
        batch_size_fn=engine.chunk_cost,
    )
    async def run(chunks: list[Chunk]) -> list[np.ndarray]:
        parts, stats = await asyncio.to_thread(engine.forward, chunks)
        if on_batch is not None:
            on_batch(stats)
        return parts

    return run
