"""Config models: descriptions everywhere, strict keys, field-path errors, overrides, presets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from reasonembed.config import JOB_CONFIGS, ConfigError, job_config_class, load_job_config
from reasonembed.config.base import apply_overrides, parse_override

REPO = Path(__file__).resolve().parents[1]


def _models(model: type[BaseModel], seen: set) -> list[type[BaseModel]]:
    """The model and every pydantic model nested in its fields."""
    if model in seen:
        return []
    seen.add(model)
    out = [model]
    for f in model.model_fields.values():
        ann = f.annotation
        for t in (ann, *getattr(ann, "__args__", ())):
            for inner in (t, *getattr(t, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    out += _models(inner, seen)
    return out


def _available_verbs():
    verbs = []
    for verb in JOB_CONFIGS:
        try:
            job_config_class(verb)
            verbs.append(verb)
        except ModuleNotFoundError:
            continue
    return verbs


@pytest.mark.parametrize("verb", _available_verbs())
def test_every_field_has_a_description(verb):
    missing = [f"{m.__name__}.{name}" for m in _models(job_config_class(verb), set())
               for name, f in m.model_fields.items() if not (f.description or "").strip()]
    assert not missing, missing


def test_unknown_key_and_wrong_type_name_the_field_path(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("embedder:\n  model: minilm\n  poolin: mean\nengine:\n  actors: many\n")
    with pytest.raises(ConfigError) as exc:
        load_job_config("encode", cfg)
    msg = str(exc.value)
    assert "embedder.poolin: unknown key" in msg
    assert "engine.actors: Input should be a valid integer" in msg


def test_overrides_are_typed_and_nested():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=3", "a.c=true", "d.e=[1, 2]", "f=null", "g=text"])
    assert data == {"a": {"b": 3, "c": True}, "d": {"e": [1, 2]}, "f": None, "g": "text"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="is not a mapping"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_job_config("encode", tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted(REPO.glob("configs/*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_presets_validate_and_carry_their_launch_line(path):
    verb = path.parent.name
    # Every preset folder names a verb this install provides: a missing one is a failure, not a skip.
    job_config_class(verb)
    load_job_config(verb, path)
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# ray job submit --working-dir . -- python jobs/{verb.replace('-', '_')}.py --config configs/{verb}/") or (
        verb == "serve" and first.startswith("#"))


def test_cli_config_error_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "reasonembed.cli", "encode", "--out", str(out), "--data", str(tmp_path),
         "embedder.bogus=1"], capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "embedder.bogus: unknown key" in proc.stderr
    assert not out.exists()


def test_cli_missing_model_and_data_exit_2(tmp_path):
    out = tmp_path / "out"
    for args, needle in (
        (["--model", str(tmp_path / "no-model"), "--data", str(REPO / "configs")], "model path does not exist"),
        (["--data", str(tmp_path / "no-data")], f"data.path: not found: {tmp_path / 'no-data'}"),
    ):
        proc = subprocess.run([sys.executable, "-m", "reasonembed.cli", "encode", "--out", str(out), *args],
                              capture_output=True, text=True, cwd=REPO, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert needle in proc.stderr
        assert not (out / "local-tiny" / "encode" / "_manifest.json").exists()
    assert not out.exists()  # refused before anything was written
