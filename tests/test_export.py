"""Export (reasonembed.redapter.export): SentenceTransformer(path) embeds exactly like the platform Embedder.

Both backbones of the trainer: all-MiniLM-L6-v2 (mean pooling, full fine-tuning) and the tiny Qwen3 with LoRA
adapters merged in (last-token pooling, left padding, EOS appended by the exported tokenizer). The adapters' B
matrices are set to non-zero values first, so that merging changes the weights and a lost merge would show.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reasonembed.config.embedder import EmbedderConfig
from reasonembed.models.embedder import Embedder
from reasonembed.models.lora import apply_lora, merged
from reasonembed.redapter.export import SentenceFormat, export_model, prompt_prefix, st_prompts

INSTRUCTION = "Given a forum question, retrieve the post that answers it"
QUERIES = ["Who has participated in a community skills workshop in Japan?", "Which speaker has been to Lima?"]
DOCS = [
    "2024-11-16 09:01, Dante: I recently took part in a spoken word workshop right behind the Church of St Michael.",
    "ok",
    "Took the train from Kyoto to Osaka and joined a pottery class; the teacher was patient and funny.",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def embedder(model: str, **kw) -> Embedder:
    return Embedder(EmbedderConfig(model=model, device="cpu", max_length=128, **kw))


def test_prompts():
    fmt = "Instruct: {task}\nQuery: {query}"
    assert prompt_prefix(fmt, "find it") == "Instruct: find it\nQuery: "
    assert st_prompts(fmt, "find it", {"biology": "bio task", "leetcode": ""}) == {
        "document": "", "biology": "Instruct: bio task\nQuery: ", "query": "Instruct: find it\nQuery: "}
    assert st_prompts(fmt, None)["query"] == ""
    with pytest.raises(ValueError, match="must end with"):
        prompt_prefix("{query} [{task}]", "x")


@pytest.mark.parametrize("ref", ["minilm", "tiny-qwen3"])
def test_sentence_transformers_matches_platform_embedder(ref, tmp_path, tiny_qwen3_path, minilm_path):
    from sentence_transformers import SentenceTransformer

    base = embedder(ref)
    model = base.model
    if ref == "tiny-qwen3":
        torch.manual_seed(0)
        model = apply_lora(model, r=4, alpha=8, dropout=0.0, targets=TARGETS)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0.0, 0.05)
        model = merged(model)
        assert not any("lora" in n for n, _ in model.named_parameters())
    out = tmp_path / "model"
    fmt = SentenceFormat(pooling=base.pooling, normalize=True, max_length=base.max_length,
                         append_eos=base.append_eos, prompts=st_prompts(base.cfg.query_format, INSTRUCTION))
    export_model(model, base.tokenizer, str(out), fmt, info={"base_model": ref})

    pool = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pool["pooling_mode_lasttoken" if ref == "tiny-qwen3" else "pooling_mode_mean_tokens"] is True
    st = SentenceTransformer(str(out), device="cpu")
    assert st.max_seq_length == 128
    reloaded = embedder(str(out), query_instruction=INSTRUCTION)
    assert (reloaded.pooling, reloaded.max_length) == (base.pooling, 128)
    np.testing.assert_allclose(st.encode(QUERIES, prompt_name="query"), reloaded.encode(QUERIES, is_query=True),
                               atol=1e-5)
    np.testing.assert_allclose(st.encode(DOCS), reloaded.encode(DOCS), atol=1e-5)

    # ... and both equal the in-memory model the export was written from.
    base.model = model.eval()
    np.testing.assert_allclose(reloaded.encode(DOCS), base.encode(DOCS), atol=1e-5)
    if ref == "tiny-qwen3":
        tok = st.tokenizer
        assert tok.padding_side == "left" and tok("a")["input_ids"][-1] == tok.eos_token_id
        assert not np.allclose(embedder(ref).encode(DOCS), reloaded.encode(DOCS), atol=1e-3)  # merge took effect


def test_export_to_s3(s3_server, tmp_path, minilm_path):
    import pyarrow.fs as pafs
    from sentence_transformers import SentenceTransformer

    from reasonembed.storage import resolve

    base = embedder("minilm")
    uri = "s3://reasonembed/export-test/model"
    export_model(base.model, base.tokenizer, uri, SentenceFormat(pooling="mean", normalize=True, max_length=128,
                 append_eos=False, prompts=st_prompts(base.cfg.query_format, INSTRUCTION)))
    fs, path = resolve(uri)
    local = tmp_path / "dl"
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    st = SentenceTransformer(str(local), device="cpu")
    np.testing.assert_allclose(st.encode(DOCS), base.encode(DOCS), atol=1e-5)


def test_truncated_inputs_match_sentence_transformers(tmp_path, tiny_qwen3_path):
    """Inputs longer than max length: the exported tokenizer appends EOS itself and keeps it when it truncates, so the
    Embedder must cut at max_length like sentence-transformers (not one token earlier), and both must equal the ids
    the training-time Embedder (base tokenizer, EOS appended by us) built for the same text."""
    from sentence_transformers import SentenceTransformer

    base = Embedder(EmbedderConfig(model="tiny-qwen3", device="cpu", max_length=16))
    out = tmp_path / "model"
    export_model(base.model, base.tokenizer, str(out), SentenceFormat(pooling="last_token", normalize=True,
                 max_length=16, append_eos=True, prompts=st_prompts(base.cfg.query_format, INSTRUCTION)))
    st = SentenceTransformer(str(out), device="cpu")
    reloaded = Embedder(EmbedderConfig(model=str(out), device="cpu", query_instruction=INSTRUCTION))
    assert reloaded.max_length == 16 and reloaded.tokenizer_appends_eos and not base.tokenizer_appends_eos
    texts = DOCS + QUERIES  # two documents and both queries are longer than 16 tokens
    ids, flags = reloaded.token_ids_with_flags(texts)
    assert sum(flags) >= 3 and all(len(x) <= 16 for x in ids)
    feats = st.preprocess(texts)
    st_ids = [row[mask.bool()].tolist() for row, mask in zip(feats["input_ids"], feats["attention_mask"], strict=True)]
    assert ids == st_ids
    assert base.token_ids_with_flags(texts) == (ids, flags), "training-time and exported ids differ"
    np.testing.assert_allclose(st.encode(texts), reloaded.encode(texts), atol=1e-5)
    np.testing.assert_allclose(st.encode(QUERIES, prompt_name="query"), reloaded.encode(QUERIES, is_query=True),
                               atol=1e-5)


def test_over_length_error_counts_the_exported_tokenizers_eos_once(tmp_path):
    """The serving engine's truncate=false error reports an input's real token count: +1 for the EOS that
    last-token pooling appends only when the tokenizer does not add it itself (exported decoders do)."""
    from reasonembed.config.serve import BatchingConfig
    from reasonembed.serving.embedding_engine import EmbedCall, EmbeddingEngine
    from reasonembed.serving.errors import ContextLengthExceeded

    base = Embedder(EmbedderConfig(model="tiny-qwen3", device="cpu", max_length=16))
    out = tmp_path / "model"
    export_model(base.model, base.tokenizer, str(out), SentenceFormat(pooling="last_token", normalize=True,
                 max_length=16, append_eos=True, prompts=st_prompts(base.cfg.query_format, INSTRUCTION)))
    text = DOCS[0]
    for folder in (str(out), "tiny-qwen3"):
        engine = EmbeddingEngine(EmbedderConfig(model=folder, device="cpu", max_length=16),
                                 BatchingConfig(token_budget=256))
        with_eos = engine.embedder.tokenizer(text)["input_ids"]
        tokens = len(with_eos) + (0 if engine.embedder.tokenizer_appends_eos else 1)
        with pytest.raises(ContextLengthExceeded, match=rf"input\[0\] has {tokens} tokens"):
            engine.prepare(EmbedCall(texts=[text], truncate=False))
