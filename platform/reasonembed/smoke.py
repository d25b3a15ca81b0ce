"""The embedded-default smoke run: vLLM generation through Ray Data, and MiniLM embeddings, on a local cluster.

This is what `make demo` falls back to when the end-to-end pipeline is not requested: it proves the two engines the
platform stands on work on this machine (the tiny Qwen3 is a random-weight model built offline, so its text is
gibberish by design: it exercises the engine, not language).
"""

from __future__ import annotations

import time

from reasonembed.config.base import RayConfig
from reasonembed.config.embedder import EmbedderConfig
from reasonembed.config.llm import LLMEngineConfig

SENTENCES = [
    "Which theorem bounds the error of a Taylor polynomial?",
    "Lagrange's form of the remainder gives the error of a Taylor approximation.",
    "Pony uses reference capabilities to make data races impossible.",
]


def run(ray_cfg: RayConfig | None = None, generator: str = "tiny-qwen3", rows: int = 4) -> dict:
    """Generate ``rows`` short texts with vLLM via ray.data.llm and embed three sentences with MiniLM."""
    import numpy as np

    from reasonembed.llm import generate_tables
    from reasonembed.models.embedder import Embedder
    from reasonembed.runtime import connect_ray

    connect_ray(ray_cfg or RayConfig(num_cpus=2, object_store_memory_mb=512))
    t0 = time.time()
    cfg = LLMEngineConfig(model=generator, max_model_len=512, batch_size=rows, concurrency=1,
                          sampling={"temperature": 1.0, "top_p": 0.6, "max_tokens": 24})
    prompts = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"Write a question about topic {i}."}]}
               for i in range(rows)]
    ok, errors = generate_tables(prompts, cfg)
    gen_s = time.time() - t0
    t1 = time.time()
    emb = Embedder(EmbedderConfig(model="minilm"))
    x = emb.encode(SENTENCES)
    sims = (x @ x.T).round(3)
    return {
        "generated": ok.select(["id", "generated_text"]).to_pylist(),
        "generation_errors": errors.num_rows,
        "generation_s": round(gen_s, 1),
        "embedding_shape": list(x.shape),
        "cosine_q_vs_docs": [float(sims[0, 1]), float(sims[0, 2])],
        "embedding_s": round(time.time() - t1, 1),
        "norms": [round(float(n), 4) for n in np.linalg.norm(x, axis=1)],
    }
