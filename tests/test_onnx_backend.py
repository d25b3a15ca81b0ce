"""The ONNX Runtime backend reproduces sentence-transformers (fp32) and caches its export safely."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_embedder import TEXTS as EMBEDDER_TEXTS

from reasonembed.config.embedder import EmbedderConfig
from reasonembed.models.embedder import Embedder
from reasonembed.models.onnx_runtime import OnnxEncoder, cache_key, cache_root, ensure_onnx, pool_numpy

# The embedder tests' texts (empty, over-length, short) plus one real SciFact title.
TEXTS = [*EMBEDDER_TEXTS,
         "Microstructural development of human newborn cerebral white matter assessed in vivo by diffusion tensor MRI."]


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory) -> Path:
    """A private export cache for this module (the env var is read at export time, in this process)."""
    root = tmp_path_factory.mktemp("reasonembed-cache")
    old = os.environ.get("REASONEMBED_CACHE")
    os.environ["REASONEMBED_CACHE"] = str(root)
    yield root / "onnx"
    if old is None:
        os.environ.pop("REASONEMBED_CACHE", None)
    else:
        os.environ["REASONEMBED_CACHE"] = old


def test_onnx_backend_matches_sentence_transformers(minilm_path, onnx_cache):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_path), device="cpu")
    ref = st.encode(TEXTS, batch_size=2, normalize_embeddings=True, convert_to_numpy=True)
    emb = Embedder(EmbedderConfig(model="minilm", backend="onnx", token_budget=300))
    assert emb.onnx is not None
    res = emb.encode_with_stats(TEXTS)
    cos = (res.embeddings * ref).sum(1)
    assert np.all(np.abs(cos - 1) < 1e-5), cos
    assert np.allclose(res.embeddings, ref, atol=1e-5)
    assert res.n_truncated == 1 and res.n_batches > 1
    # The graph in the cache is the fused one and was verified against torch when exported.
    meta = json.loads((emb.onnx.graph.parent / "meta.json").read_text())
    assert emb.onnx.graph.parent.parent == onnx_cache
    assert meta["fused_ops"].get("Attention") == 6 and meta["max_abs_diff"] < 1e-4
    # The torch backend gives the same rows (training keeps using torch; inference may use either).
    torch_rows = Embedder(EmbedderConfig(model="minilm", token_budget=300)).encode(TEXTS)
    assert np.allclose(res.embeddings, torch_rows, atol=1e-5)


def test_export_is_cached_and_reused(minilm_path, onnx_cache):
    first = ensure_onnx(minilm_path)
    mtime = first.stat().st_mtime_ns
    again = ensure_onnx(minilm_path)
    assert again == first and again.stat().st_mtime_ns == mtime  # no second export
    assert first.parent.name == cache_key(minilm_path)
    assert not [p for p in onnx_cache.iterdir() if p.name.startswith(".")]  # no temporary folders left behind
    enc = OnnxEncoder(first, num_threads=1)
    ids = np.array([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    pooled = enc.pooled(ids, mask, "mean", True)
    assert pooled.shape == (2, 384) and np.allclose(np.linalg.norm(pooled, axis=1), 1, atol=1e-6)


def test_cache_key_follows_the_model_files(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    k1 = cache_key(folder)
    assert cache_key(folder) == k1
    assert cache_key(folder, precision="int8") != k1
    (folder / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    assert cache_key(folder) != k1
    monkeypatch.setenv("REASONEMBED_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c" / "onnx"


@pytest.mark.parametrize("pooling", ["mean", "cls", "last_token"])
def test_numpy_pooling_equals_embedder_pooling(minilm_path, pooling):
    emb = Embedder(EmbedderConfig(model="minilm", pooling=pooling, append_eos=False))
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=np.int64)
    if pooling == "last_token":
        mask = mask[:, ::-1].copy()  # left padding, as the Embedder uses for last-token pooling
    want = torch.nn.functional.normalize(emb.pool(torch.from_numpy(hidden), torch.from_numpy(mask)), dim=-1)
    assert np.allclose(pool_numpy(hidden, mask, pooling, True), want.numpy(), atol=1e-6)


def test_onnx_backend_with_a_model_in_memory_uses_torch(minilm_path, onnx_cache, caplog):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(minilm_path), add_pooling_layer=False).eval()
    emb = Embedder(EmbedderConfig(model="minilm", backend="onnx"), model=model)
    assert emb.onnx is None  # the ONNX graph holds the folder's weights, not these (e.g. mid-training) ones
    assert "using torch" in caplog.text


@pytest.mark.slow
def test_encode_job_with_onnx_backend_equals_torch(ray_local, mini_scifact, tmp_path):
    """The Ray Data actor pool runs the ONNX backend end to end; rows equal the torch Embedder's to 1e-5 cosine.
    (Actors read REASONEMBED_CACHE from the environment the cluster started with.)"""
    from reasonembed.config.encode import CorpusSource, EncodeJobConfig
    from reasonembed.index import encode
    from reasonembed.index.reader import _row_text
    from reasonembed.storage import open_run

    cfg = EncodeJobConfig(out=str(tmp_path), run_id="onnx", data={"path": str(mini_scifact), "limit": 30},
                          embedder={"model": "minilm", "backend": "onnx"})
    summary = encode.run(cfg)
    ids, x = encode.load_embeddings(open_run(str(tmp_path), "onnx").stage("encode"))
    assert summary.rows == 30 == len(ids)
    rows = [json.loads(line) for line in (mini_scifact / "corpus.jsonl").read_text().splitlines()[:30]]
    texts = {d: t for d, t, _ in (_row_text(r, CorpusSource()) for r in rows)}
    ref = Embedder(EmbedderConfig(model="minilm")).encode([texts[d] for d in ids])
    cos = (x * ref).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.all(np.abs(1 - cos) < 1e-5), np.abs(1 - cos).max()


@pytest.mark.slow
def test_int8_backend_is_an_opt_in_lossy_option(minilm_path, onnx_cache):
    """onnx-int8 is a separate cache entry and close to fp32, but not equal to it (so it never counts as fp32)."""
    texts = TEXTS[:2] + TEXTS[3:]
    fp32 = Embedder(EmbedderConfig(model="minilm", backend="onnx")).encode(texts)
    int8 = Embedder(EmbedderConfig(model="minilm", backend="onnx-int8"))
    assert int8.onnx.graph != ensure_onnx(minilm_path)
    got = int8.encode(texts)
    dev = np.abs(1 - (got * fp32).sum(1))
    assert dev.max() < 0.05 and dev.max() > 1e-5, dev
