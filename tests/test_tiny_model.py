"""reasonembed.models.tiny: an offline tiny Qwen3 that is deterministic, cached atomically and loads in transformers."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from reasonembed.models.tiny import (
    IM_END,
    IM_START,
    REQUIRED_FILES,
    TinyQwen3Spec,
    ensure_tiny_qwen3,
    spec_hash,
)


def _digests(folder):
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in REQUIRED_FILES}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two independent builds with seed 0 and one with seed 1, each in its own cache dir."""
    a = ensure_tiny_qwen3(tmp_path_factory.mktemp("a"), seed=0)
    b = ensure_tiny_qwen3(tmp_path_factory.mktemp("b"), seed=0)
    c = ensure_tiny_qwen3(tmp_path_factory.mktemp("c"), seed=1)
    return a, b, c


def test_same_seed_gives_byte_identical_files(built):
    a, b, c = built
    assert a.name == b.name and a.name.startswith("tiny-qwen3-")
    assert _digests(a) == _digests(b)
    assert c.name != a.name
    da, dc = _digests(a), _digests(c)
    assert da["model.safetensors"] != dc["model.safetensors"]
    # The tokenizer does not depend on the seed.
    assert da["tokenizer.json"] == dc["tokenizer.json"]


def test_cache_hit_returns_same_folder_without_rebuilding(built):
    a, _, _ = built
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_qwen3(a.parent, seed=0) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime


def test_concurrent_builders_share_one_complete_folder(tmp_path):
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: ensure_tiny_qwen3(tmp_path, seed=7), range(3)))
    assert len(set(paths)) == 1
    assert all((paths[0] / f).is_file() for f in REQUIRED_FILES)
    # No temporary build folders are left behind.
    assert [p.name for p in tmp_path.iterdir()] == [paths[0].name]


def test_incomplete_folder_is_rebuilt(tmp_path):
    path = ensure_tiny_qwen3(tmp_path, seed=3)
    (path / "model.safetensors").unlink()
    assert ensure_tiny_qwen3(tmp_path, seed=3) == path
    assert (path / "model.safetensors").is_file()


def test_spec_changes_the_cache_key_and_shape(tmp_path):
    spec = TinyQwen3Spec(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
    assert spec_hash(spec, 0) != spec_hash(TinyQwen3Spec(), 0)
    path = ensure_tiny_qwen3(tmp_path, seed=0, spec=spec)
    cfg = json.loads((path / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["architectures"]) == (64, 1, ["Qwen3ForCausalLM"])


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="multiple of"):
        TinyQwen3Spec(num_attention_heads=3, num_key_value_heads=2)
    with pytest.raises(ValueError, match="vocab_size"):
        TinyQwen3Spec(vocab_size=100_000)
    with pytest.raises(ValueError, match="extra"):
        TinyQwen3Spec(hidden=64)


def test_loads_in_transformers_with_chat_template_and_special_tokens(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = built[0]
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == TinyQwen3Spec().vocab_size
    assert tok.eos_token == IM_END and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id != tok.pad_token_id
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why do birds migrate?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nWhy do birds migrate?{IM_END}\n{IM_START}assistant\n"
    )
    no_think = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert no_think.endswith("assistant\n<think>\n\n</think>\n\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # Special tokens are single ids; the text round-trips exactly.
    assert ids.count(tok.convert_tokens_to_ids(IM_START)) == 3
    assert tok.decode(ids) == text

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 5_000_000
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    assert len(ids) < out.shape[1] <= len(ids) + 5
    gen = json.loads((path / "generation_config.json").read_text())
    assert set(gen["eos_token_id"]) == {tok.eos_token_id, tok.pad_token_id}


def test_works_as_last_token_embedding_backbone(built):
    from transformers import AutoModel, AutoTokenizer

    path = built[0]
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModel.from_pretrained(path).eval()
    texts = ["plate tectonics and volcanoes", "a binary search returns the index of the target in a sorted list"]
    batch = tok([t + tok.eos_token for t in texts], padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    emb = torch.nn.functional.normalize(hidden[:, -1], dim=-1)
    assert emb.shape == (2, TinyQwen3Spec().hidden_size)
    assert torch.isfinite(emb).all()
    # Left padding keeps the last position real for every row: the short text's embedding does not change
    # when it is encoded alone.
    alone = tok([texts[0] + tok.eos_token], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        single = torch.nn.functional.normalize(model(**alone).last_hidden_state[:, -1], dim=-1)
    torch.testing.assert_close(single[0], emb[0], atol=1e-4, rtol=1e-4)
