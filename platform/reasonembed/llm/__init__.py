"""LLM generation for the platform: vLLM engines as Ray Data actor pools through ``ray.data.llm``.

Entry points:

- :func:`generate` (rows + ``LLMEngineConfig`` + ``build_messages`` -> lazy Dataset, one output row per input row:
  ``generated_text`` or ``error``/``error_detail``) and :func:`generate_tables` (same, as ``(ok, errors)`` Arrow
  tables for a stage shard); :func:`split_errors` splits any result.
- :func:`check_prompts`: the length/format pre-filter alone (``prompt_too_long`` / ``bad_input`` rows).
- :func:`to_processor_config` / :func:`build_generation_processor`: Ray's processor config and processor, for
  callers composing their own pipeline.
- Structured output: :func:`json_output`, :func:`json_schema_of`, :func:`parse_json_output`.

Imports of Ray and vLLM are deferred to call time so that configs and helpers stay importable without them.
"""

from reasonembed.llm.engine_args import resolve_model_source, to_processor_config
from reasonembed.llm.generation import build_generation_processor, generate, generate_tables, split_errors
from reasonembed.llm.prompts import (
    BAD_INPUT,
    ENGINE_ERROR,
    PROMPT_TOO_LONG,
    RequestBuilder,
    check_prompts,
    prepare_requests,
    render_prompt,
    validate_messages,
)
from reasonembed.llm.sampling import row_seed, sampling_params_for
from reasonembed.llm.structured import OutputParseError, json_output, json_schema_of, parse_json_output

__all__ = [
    "BAD_INPUT",
    "ENGINE_ERROR",
    "PROMPT_TOO_LONG",
    "OutputParseError",
    "RequestBuilder",
    "build_generation_processor",
    "check_prompts",
    "generate",
    "generate_tables",
    "json_output",
    "json_schema_of",
    "parse_json_output",
    "prepare_requests",
    "render_prompt",
    "resolve_model_source",
    "row_seed",
    "sampling_params_for",
    "split_errors",
    "to_processor_config",
    "validate_messages",
]
