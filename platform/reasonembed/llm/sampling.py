"""Per-row vLLM sampling parameters (a plain dict, the form Ray's vLLM stage turns into ``vllm.SamplingParams``).

Every row gets its own seed, ``(base_seed * 1_000_003 + crc32(row_id)) mod 2^31``: the output of a row then depends
only on its prompt, its id and the base seed, never on which batch or replica it landed in, and rows that share a
prompt (several queries sampled from one document) still differ.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from reasonembed.config.llm import LLMEngineConfig, StructuredOutputConfig


def row_seed(base_seed: int, row_id: Any) -> int:
    """Deterministic 31-bit seed for one row (stable across processes, unlike ``hash``)."""
    return (base_seed * 1_000_003 + zlib.crc32(str(row_id).encode("utf-8"))) % (2**31)


def structured_outputs_params(so: StructuredOutputConfig) -> dict[str, Any]:
    """``vllm.sampling_params.StructuredOutputsParams`` kwargs.

    The JSON schema is sent as a string: a nested dict would become an Arrow struct whose shape differs from schema
    to schema, and vLLM accepts both forms.
    """
    out: dict[str, Any] = {}
    if so.json_schema is not None:
        out["json"] = json.dumps(so.json_schema, sort_keys=True)
    elif so.choice is not None:
        out["choice"] = list(so.choice)
    else:
        out["regex"] = so.regex
    if so.disable_any_whitespace:
        out["disable_any_whitespace"] = True
    return out


def sampling_params_for(cfg: LLMEngineConfig, row_id: Any) -> dict[str, Any]:
    """The ``sampling_params`` column value for one row."""
    s = cfg.sampling
    params: dict[str, Any] = {
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "max_tokens": s.max_tokens,
        "min_tokens": s.min_tokens,
        "repetition_penalty": s.repetition_penalty,
        "seed": None if s.seed is None else row_seed(s.seed, row_id),
    }
    if s.stop:
        params["stop"] = list(s.stop)
    if cfg.structured_output is not None:
        params["structured_outputs"] = structured_outputs_params(cfg.structured_output)
    return params
