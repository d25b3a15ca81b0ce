"""The Embedder reproduces sentence-transformers and batches by token budget."""

from __future__ import annotations

import numpy as np
import pytest

from reasonembed.config.embedder import EmbedderConfig
from reasonembed.models.embedder import Embedder, budget_batches
from reasonembed.models.registry import ModelNotFoundError, resolve_model

TEXTS = [
    "The cat sat on the mat.",
    "Reasoning-intensive retrieval needs queries that require inference beyond keyword overlap.",
    "",
    "word " * 400,  # longer than MiniLM's 256-token limit: truncated, like sentence-transformers does
    "Short.",
]


def test_budget_batches_respects_budget_and_keeps_every_row():
    lengths = [5, 100, 30, 30, 7, 250, 1, 64]
    batches = budget_batches(lengths, token_budget=128, max_batch_size=3)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        width = max(lengths[i] for i in b)
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * width <= 128
    # longest first, so padding stays small
    assert batches[0] == [5]


def test_budget_batches_min_fill_splits_mixed_lengths():
    lengths = [256, 20, 18, 25, 200, 22, 130]  # one long document among short queries
    plain = budget_batches(lengths, token_budget=8192, max_batch_size=64)
    assert len(plain) == 1  # everything fits: every query is padded to 256 tokens
    split = budget_batches(lengths, token_budget=8192, max_batch_size=64, min_fill=0.5)
    assert split == [[0, 4, 6], [3, 5, 1, 2]]  # 256/200/130, then the queries: each row >= half its batch width
    padded = sum(len(b) * max(lengths[i] for i in b) for b in split)
    assert padded == 3 * 256 + 4 * 25 < len(lengths) * 256
    for b in split:
        assert min(lengths[i] for i in b) >= 0.5 * max(lengths[i] for i in b)


def test_minilm_matches_sentence_transformers(minilm_path):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_path), device="cpu")
    ref = st.encode(TEXTS, batch_size=2, normalize_embeddings=False, convert_to_numpy=True)
    emb = Embedder(EmbedderConfig(model="minilm", token_budget=300))
    res = emb.encode_with_stats(TEXTS)
    assert emb.pooling == "mean" and emb.max_length == 256 and emb.dim == 384
    cos = (res.embeddings * ref).sum(1) / np.linalg.norm(ref, axis=1)
    assert np.all(np.abs(cos - 1) < 1e-5), cos
    assert np.allclose(res.embeddings, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    assert res.n_truncated == 1
    assert res.n_batches > 1


def test_query_instruction_format(minilm_path):
    emb = Embedder(EmbedderConfig(model="minilm", query_instruction="Given a post, retrieve passages"))
    assert emb.format_queries(["q1"]) == ["Instruct: Given a post, retrieve passages\nQuery: q1"]
    assert emb.format_queries(["q1"], instruction="") == ["q1"]
    q = emb.encode(["q1"], is_query=True)
    d = emb.encode(["Instruct: Given a post, retrieve passages\nQuery: q1"])
    assert np.allclose(q, d, atol=1e-6)


def test_last_token_pooling_left_pads_and_appends_eos(tiny_qwen3_path):
    emb = Embedder(EmbedderConfig(model=str(tiny_qwen3_path), max_length=32, token_budget=64))
    assert emb.pooling == "last_token" and emb.append_eos
    ids, n_trunc = emb.token_ids(["hello world", "a much longer text " * 20])
    assert all(x[-1] == emb.tokenizer.eos_token_id for x in ids)
    assert n_trunc == 1 and len(ids[1]) == 32
    batch = emb.pad(ids)
    assert bool(batch["attention_mask"][:, -1].all())  # left padding: position -1 is real everywhere
    # batch composition must not change a row's embedding
    together = emb.encode(["hello world", "a much longer text " * 20])
    alone = emb.encode(["hello world"])
    assert np.allclose(together[0], alone[0], atol=1e-5)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
