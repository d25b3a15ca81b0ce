"""Batch encoding through a running Serve embedding deployment (Ray Data over a deployment handle).

Instead of starting its own Embedder actors, a batch job (``reasonembed encode`` with ``engine.backend: serve``,
or synthesis mining) can send its rows to the ``EmbeddingModel`` replicas that also serve online traffic: one set
of model replicas, one batching policy, identical embeddings. This mirrors ``ray.data.llm``'s Serve-deployment
processor: a small Ray Data actor pool holds a ``DeploymentHandle`` and, per block of rows, sends
``embed(EmbedCall)`` calls of ``rows_per_call`` rows concurrently; the replicas pack them into token-budget
batches together with other traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reasonembed.serving import MODEL_DEPLOYMENT
from reasonembed.serving.embedding_engine import EmbedCall
from reasonembed.serving.errors import ServingError

# The fields of Embedder.describe() that decide whether two encoders give the same vectors.
MATCH_KEYS = ("model_name", "pooling", "normalize", "max_length", "append_eos", "query_format", "dim")


@dataclass(frozen=True)
class ServedEncoding:
    """Where and how a batch job's rows are embedded through Serve."""

    app_name: str  # the Serve application running the EmbeddingModel deployment
    deployment: str = MODEL_DEPLOYMENT
    is_query: bool = False  # format rows as queries (the model's instruction template)
    instruction: str | None = None  # task instruction for queries (None: the model's default)
    rows_per_call: int = 256  # rows per embed() call; calls of one block run concurrently
    text_column: str = "text"


class ServeEmbedder:
    """Ray Data UDF: embeds the ``text`` column of a numpy batch through the deployment handle.

    Output columns: every input column except ``text``, plus ``embedding`` (float32 [N, D]), ``n_tokens`` and
    ``truncated`` — the same columns the actor-pool engine produces.
    """

    def __init__(self, spec: ServedEncoding):
        from ray import serve

        self.handle = serve.get_deployment_handle(spec.deployment, app_name=spec.app_name)
        self.is_query, self.instruction = spec.is_query, spec.instruction
        self.rows_per_call, self.text_column = spec.rows_per_call, spec.text_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch[self.text_column]]
        calls = [
            self.handle.embed.remote(EmbedCall(texts=texts[i:i + self.rows_per_call], is_query=self.is_query,
                                               instruction=self.instruction, truncate=True))
            for i in range(0, len(texts), self.rows_per_call)
        ]
        replies = [c.result() for c in calls]
        for r in replies:
            if isinstance(r, ServingError):  # cannot happen for texts with truncate=True; never drop rows silently
                raise r
        out = {k: v for k, v in batch.items() if k != self.text_column}
        if replies:
            out["embedding"] = np.concatenate([r.embeddings for r in replies]).astype(np.float32, copy=False)
        else:
            out["embedding"] = np.zeros((0, 0), np.float32)
        out["n_tokens"] = np.array([n for r in replies for n in r.n_tokens], dtype=np.int32)
        out["truncated"] = np.array([f for r in replies for f in r.truncated], dtype=bool)
        return out


def serve_encode(ds, spec: ServedEncoding | str, window_rows: int = 1024, concurrency: int = 1):
    """``ds`` (with a ``text`` column) -> ``ds`` with ``embedding``, ``n_tokens``, ``truncated`` via Serve.

    ``spec`` may be just the application name (documents, default deployment). The UDF actors only wait on the
    deployment, so they reserve almost no CPU; throughput is set by the number of model replicas (scale them with
    the deployment's autoscaling config).
    """
    import ray

    spec = ServedEncoding(spec) if isinstance(spec, str) else spec
    return ds.map_batches(
        ServeEmbedder,
        fn_constructor_kwargs={"spec": spec},
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        batch_size=window_rows,
        batch_format="numpy",
        num_cpus=0.01,
    )


def served_encoder(app_name: str, deployment: str = MODEL_DEPLOYMENT) -> dict:
    """``describe()`` of the served model (record it in index manifests built from served embeddings)."""
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=app_name).describe.remote().result()


def encoder_mismatch(served: dict, expected: dict) -> list[str]:
    """Fields where the served encoder differs from the one a job expects (empty list: same vectors)."""
    return [f"{k}: served {served.get(k)!r} != expected {expected.get(k)!r}"
            for k in MATCH_KEYS if k in served and k in expected and served[k] != expected[k]]
