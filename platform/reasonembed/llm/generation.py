"""Generation through ``ray.data.llm``: rows in, one output row per input row out (text or error, never dropped).

Pipeline (all lazy Ray Data operators; the engine is an autoscaling actor pool of vLLM replicas)::

    input rows ─ map(RequestBuilder) ─► ray.data.llm vLLM stage ─ map(normalize) ─► output rows
                 chat template, tokens,   (should_continue_on_error:   fixed schema
                 length check, seeds       failures become rows)

Output columns: the kept input columns (default: all), then

- ``generated_text`` (str, "" on error), ``num_input_tokens``, ``num_generated_tokens`` (int);
- ``truncated`` (bool): generation stopped at ``max_tokens`` (a JSON object may be incomplete);
- ``error``: "" for success, else ``prompt_too_long`` | ``bad_input`` | ``engine_error``;
- ``error_detail``: the message (names the row id and the cause).

Example::

    from reasonembed.config.llm import LLMEngineConfig
    from reasonembed.llm import generate, split_errors

    cfg = LLMEngineConfig(model="tiny-qwen3", max_model_len=512, sampling={"max_tokens": 32})
    out = generate(rows, cfg, lambda r: [{"role": "user", "content": r["text"]}], id_column="doc_id")
    ok, errors = split_errors(out)          # two materialized Datasets (or pass a pyarrow Table)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from reasonembed.config.llm import LLMEngineConfig
from reasonembed.llm.engine_args import resolve_model_source, to_processor_config
from reasonembed.llm.prompts import ENGINE_ERROR, BuildMessages, RequestBuilder

if TYPE_CHECKING:
    from reasonembed.llm.engine_pool import EnginePool

OUTPUT_FIELDS = (
    "generated_text", "num_input_tokens", "num_generated_tokens", "truncated", "error", "error_detail",
)


def build_generation_processor(cfg: LLMEngineConfig, model_source: str | None = None):
    """Ray's vLLM processor for request rows made by :class:`RequestBuilder` (identity pre/postprocess).

    Error rows bypass Ray's postprocess and come back as the raw data dict, so shaping the output is left to
    :func:`normalize_output`, which sees success and error rows alike.
    """
    from ray.data.llm import build_processor

    return build_processor(to_processor_config(cfg, model_source))


class OutputNormalizer:
    """Processor row -> output row with the fixed columns of the module docstring (a ``Dataset.map`` function)."""

    def __init__(self, max_tokens: int, keep_columns: Sequence[str] | None = None):
        self.max_tokens = max_tokens
        self.keep_columns = list(keep_columns) if keep_columns is not None else None

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        source = row.get("__row") or {}
        if self.keep_columns is None:
            out = {k: v for k, v in source.items() if k not in OUTPUT_FIELDS}
        else:
            out = {k: source.get(k) for k in self.keep_columns}
        message = row.get("__inference_error__") or ""
        reason = row.get("__reason") or (ENGINE_ERROR if message else "")
        n_gen = int(row.get("num_generated_tokens") or 0) if not message else 0
        out.update(
            generated_text=(row.get("generated_text") or "") if not message else "",
            num_input_tokens=int(row.get("num_prompt_tokens") or row.get("num_input_tokens") or 0),
            num_generated_tokens=n_gen,
            truncated=bool(n_gen >= self.max_tokens),
            error=reason,
            error_detail=message,
        )
        return out


def as_dataset(data: Any):
    """A Ray Dataset from a Dataset, a pyarrow Table, a pandas DataFrame, or an iterable of dict rows."""
    import ray

    if isinstance(data, ray.data.Dataset):
        return data
    try:
        import pyarrow as pa

        if isinstance(data, pa.Table):
            return ray.data.from_arrow(data)
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        pass
    if hasattr(data, "to_dict") and hasattr(data, "columns"):
        return ray.data.from_pandas(data)
    rows = list(data) if isinstance(data, Iterable) else None
    if rows is None or not all(isinstance(r, dict) for r in rows):
        raise TypeError("generate(): data must be a ray Dataset, pyarrow Table, pandas DataFrame or list of dicts")
    if not rows:
        raise ValueError("generate(): no input rows")
    return ray.data.from_items(rows)


def generate(
    data: Any,
    cfg: LLMEngineConfig,
    build_messages: BuildMessages | None = None,
    *,
    id_column: str = "id",
    keep_columns: Sequence[str] | None = None,
    engines: EnginePool | None = None,
    stage_name: str = "",
):
    """Generate one completion per input row with vLLM in Ray Data; returns a lazy Dataset (see module docstring).

    Args:
        data: input rows (Dataset, pyarrow Table, pandas DataFrame, list of dicts). Must hold ``id_column``.
        cfg: engine, sampling and structured-output settings.
        build_messages: ``row -> [{"role", "content"}, ...]`` or a string (one user message). None: use the
            row's ``messages`` column. Raise ``ValueError`` for rows that cannot be turned into a prompt; they
            become ``bad_input`` error rows.
        id_column: the row id column; carried to the output and used to derive each row's sampling seed.
        keep_columns: input columns to carry to the output (default: all). Output fields win on name clashes.
        engines: a run's :class:`~reasonembed.llm.engine_pool.EnginePool`: the engine step goes to that pool's
            long-lived engine for this model (started on first use) instead of an actor pool of this pipeline's own.
        stage_name: names the caller in the pool's summary (e.g. ``generate``).
    """
    ds = as_dataset(data)
    source = resolve_model_source(cfg.model)
    requests = ds.map(RequestBuilder(cfg, build_messages, id_column, model_source=source))
    if engines is not None:
        generated = engines.apply(requests, cfg, source, stage_name)
    else:
        generated = build_generation_processor(cfg, source)(requests)
    keep = None if keep_columns is None else [id_column, *[c for c in keep_columns if c != id_column]]
    return generated.map(OutputNormalizer(cfg.sampling.max_tokens, keep))


def split_errors(result: Any):
    """``(ok, errors)`` from a generation result: a pyarrow Table (split in memory) or a Dataset (materialized once)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(result, pa.Table):
        is_ok = pc.equal(result["error"], "")
        return result.filter(is_ok), result.filter(pc.invert(is_ok))
    from ray.data.expressions import col

    done = result.materialize()
    return done.filter(expr=col("error") == ""), done.filter(expr=col("error") != "")


def generate_tables(data: Any, cfg: LLMEngineConfig, build_messages: BuildMessages | None = None, **kwargs):
    """Run :func:`generate` to completion and return ``(ok, errors)`` pyarrow Tables (for stage shards)."""
    import pyarrow as pa
    import ray

    ds = generate(data, cfg, build_messages, **kwargs).materialize()
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    if not tables:
        raise RuntimeError("generate(): the run returned no rows")
    return split_errors(pa.concat_tables(tables, promote_options="permissive"))
