"""The model side of the embedding service: ``ModelReplica`` tokenises and runs token-budget batches across
requests; deployed on its own as ``EmbeddingModel`` (split topology) or held inside the HTTP ingress (fused), which
then reaches it directly or, split, through ``RemoteModel`` over a deployment handle.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from reasonembed.config.serve import ServeJobConfig
from reasonembed.serving import MODEL_DEPLOYMENT
from reasonembed.serving.batcher import make_batcher
from reasonembed.serving.embedding_engine import THREADED_TOKENIZE_CHARS, Chunk, EmbedCall, EmbeddingEngine
from reasonembed.serving.errors import ServingError
from reasonembed.serving.loopback import keep_replica_grpc_on_loopback
from reasonembed.serving.metrics import ModelMetrics


class ModelReplica:
    """One model replica: tokenises with the serving policies and runs token-budget batches across requests.

    Deployed on its own as ``EmbeddingModel`` (split topology) or held inside ``EmbeddingAPI`` (fused topology).
    """

    def __init__(self, cfg: dict[str, Any]):
        keep_replica_grpc_on_loopback()  # before Serve starts this replica's gRPC server (after the constructor)
        self.cfg = ServeJobConfig.model_validate(cfg)
        emb = self.cfg.embedder
        if emb.num_threads is None and self.cfg.replica.num_gpus == 0 and self.cfg.replica.num_cpus >= 1:
            emb = emb.model_copy(update={"num_threads": int(self.cfg.replica.num_cpus)})
        self.engine = EmbeddingEngine(emb, self.cfg.batching)
        self.engine.warmup()  # Serve routes traffic to a replica only after its constructor returns
        self.metrics = ModelMetrics()
        self.batches = {"batches": 0, "rows": 0, "max_rows": 0, "max_padded_tokens": 0}
        self._run = make_batcher(self.engine, self._on_batch)

    def _on_batch(self, stats) -> None:
        self.metrics.on_batch(stats)
        b = self.batches
        b["batches"] += 1
        b["rows"] += stats.rows
        b["max_rows"] = max(b["max_rows"], stats.rows)
        b["max_padded_tokens"] = max(b["max_padded_tokens"], stats.padded_tokens)

    async def embed(self, call: EmbedCall):
        """Embed one request; its chunks join Serve batches with other requests' chunks.

        A client error (bad token id, over-length input with truncate=false) is *returned*, not raised: it is the
        caller's problem, so it should not count as a replica error in Serve's metrics and logs.
        """
        try:
            if call.n_chars() > THREADED_TOKENIZE_CHARS:
                ids, flags = await asyncio.to_thread(self.engine.prepare, call)
            else:
                ids, flags = self.engine.prepare(call)
        except ServingError as exc:
            return exc
        plan = self.engine.plan(ids)
        parts = await asyncio.gather(*(self._run(Chunk([ids[i] for i in idx])) for idx in plan))
        return self.engine.assemble(ids, flags, plan, parts)

    async def describe(self) -> dict:
        return self.engine.describe()

    async def status(self) -> dict:
        s = self.engine.status
        return {"ready": s.ready, "warmup_s": s.warmup_s, "warmup_lengths": s.warmup_lengths,
                "token_budget": self.engine.token_budget, "batch_stats": dict(self.batches)}

    def check_health(self) -> None:
        if not self.engine.status.ready:
            raise RuntimeError("model replica is not warmed up")


EmbeddingModel = serve.deployment(name=MODEL_DEPLOYMENT)(ModelReplica)


class RemoteModel:
    """``ModelReplica``'s async interface over a deployment handle (split topology)."""

    def __init__(self, handle):
        self.handle = handle

    async def embed(self, call: EmbedCall):
        return await self.handle.embed.remote(call)

    async def describe(self) -> dict:
        return await self.handle.describe.remote()

    async def status(self) -> dict:
        return await self.handle.status.remote()
