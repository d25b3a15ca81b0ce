"""Turn input rows into engine requests: chat messages -> chat template -> token ids, with length checks.

Each input row becomes one request row with these columns (the input row itself rides along in ``__row``):

- ``prompt`` (rendered chat template), ``tokenized_prompt`` (ids), ``num_prompt_tokens``;
- ``sampling_params`` (see ``reasonembed.llm.sampling``);
- ``__reason`` / ``__inference_error__``: empty for rows to send; for rows that must not be sent, a reason code
  (:data:`PROMPT_TOO_LONG`, :data:`BAD_INPUT`) and a message naming the row. Ray's stages skip every row whose
  ``__inference_error__`` is non-empty (``StatefulStageUDF.__call__``), so such rows pass the engine untouched and
  come out as error rows instead of being dropped.

A prompt is too long when ``num_prompt_tokens > max_model_len - sampling.max_tokens``: vLLM would reject it
anyway (``VLLMValidationError``) after it had been shipped to an engine replica; checking here costs one tokenizer
call per row in the CPU stage and gives a precise, countable reason.

The template is applied the way Ray's ChatTemplateStage does (generation prompt when the last message is from the
user, otherwise the last assistant message is continued), and tokens are counted without adding special tokens
again, since the template already contains them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from reasonembed.config.llm import LLMEngineConfig
from reasonembed.llm.engine_args import REMOTE_PREFIXES
from reasonembed.llm.sampling import sampling_params_for

PROMPT_TOO_LONG = "prompt_too_long"
BAD_INPUT = "bad_input"
ENGINE_ERROR = "engine_error"
ROLES = ("system", "user", "assistant")

Messages = list[dict[str, str]]
BuildMessages = Callable[[dict[str, Any]], "Messages | str"]


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_source: str):
    """The HF tokenizer of a model source, loaded once per worker process (Ray reuses workers across tasks)."""
    from transformers import AutoTokenizer

    path = model_source
    if model_source.startswith(REMOTE_PREFIXES):
        # Same helper Ray's own tokenize stage uses to fetch only tokenizer files from s3:// or gs://.
        from ray.llm._internal.common.utils.download_utils import NodeModelDownloadable, download_model_files

        path = download_model_files(
            model_id=model_source, download_model=NodeModelDownloadable.TOKENIZER_ONLY, download_extra_files=False
        )
    return AutoTokenizer.from_pretrained(path)


def validate_messages(messages: Any, row_id: Any) -> Messages:
    """Check an OpenAI-style message list; a plain string becomes one user message. Raises ValueError naming the row."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if hasattr(messages, "tolist"):  # Arrow/NumPy round trips turn lists into arrays
        messages = messages.tolist()
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"row {row_id!r}: messages must be a non-empty list of {{role, content}}, got {messages!r:.200}")
    out: Messages = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"row {row_id!r}: messages[{i}] must be a mapping, got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ValueError(f"row {row_id!r}: messages[{i}].role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"row {row_id!r}: messages[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def render_prompt(tokenizer, messages: Messages, chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """Apply the model's chat template (generation prompt after a user turn, continuation after an assistant turn)."""
    add_generation_prompt = messages[-1]["role"] == "user"
    return tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=not add_generation_prompt,
        **dict(chat_template_kwargs or {}),
    )


class RequestBuilder:
    """Row -> request row (a ``Dataset.map`` function). See the module docstring for the output columns.

    Args:
        cfg: engine config (model, max_model_len, sampling, chat_template_kwargs).
        build_messages: ``row -> messages`` (list of {role, content}, or a string for one user message). None: the
            row's ``messages`` column. A ``ValueError`` raised here marks the row ``bad_input``; any other
            exception is a bug and fails the job.
        id_column: column holding the row id; it seeds sampling and names the row in errors.
        model_source: resolved model source (default: resolved from ``cfg.model``).
    """

    def __init__(
        self,
        cfg: LLMEngineConfig,
        build_messages: BuildMessages | None = None,
        id_column: str = "id",
        model_source: str | None = None,
    ):
        from reasonembed.llm.engine_args import resolve_model_source

        self.cfg = cfg
        self.build_messages = build_messages
        self.id_column = id_column
        self.model_source = model_source or resolve_model_source(cfg.model)
        self.limit = cfg.prompt_token_limit

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.id_column not in row:
            raise KeyError(f"input row has no id column {self.id_column!r}; columns: {sorted(row)}")
        row_id = row[self.id_column]
        out: dict[str, Any] = {
            "__row": row,
            "prompt": "",
            "tokenized_prompt": [],
            "num_prompt_tokens": 0,
            "sampling_params": sampling_params_for(self.cfg, row_id),
            "__reason": "",
            "__inference_error__": "",
        }
        try:
            raw = self.build_messages(row) if self.build_messages is not None else row.get("messages")
            messages = validate_messages(raw, row_id)
        except ValueError as exc:
            return self._fail(out, BAD_INPUT, str(exc))
        tokenizer = load_tokenizer(self.model_source)
        prompt = render_prompt(tokenizer, messages, self.cfg.chat_template_kwargs)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out["num_prompt_tokens"] = len(ids)
        if len(ids) > self.limit:
            return self._fail(
                out,
                PROMPT_TOO_LONG,
                f"row {row_id!r}: prompt has {len(ids)} tokens > limit {self.limit} "
                f"(max_model_len {self.cfg.max_model_len} - max_tokens {self.cfg.sampling.max_tokens}); "
                "shorten the input or raise max_model_len",
            )
        out["prompt"] = prompt
        out["tokenized_prompt"] = list(ids)
        return out

    @staticmethod
    def _fail(out: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
        out["__reason"] = reason
        out["__inference_error__"] = f"{reason}: {message}"
        return out


def prepare_requests(ds, cfg: LLMEngineConfig, build_messages: BuildMessages | None = None, id_column: str = "id"):
    """Lazily map a Ray Dataset of input rows to request rows (the pre-filter; see :class:`RequestBuilder`)."""
    return ds.map(RequestBuilder(cfg, build_messages, id_column))


def check_prompts(ds, cfg: LLMEngineConfig, build_messages: BuildMessages | None = None, id_column: str = "id"):
    """Pre-filter without generating: ``(ok, errors)`` Datasets of ``id, num_prompt_tokens, error, error_detail``.

    ``errors`` holds the rows that would not be sent (``prompt_too_long``, ``bad_input``). The input is
    materialized once so that both outputs come from one pass.
    """
    def summarize(req: dict[str, Any]) -> dict[str, Any]:
        return {
            id_column: req["__row"][id_column],
            "num_prompt_tokens": req["num_prompt_tokens"],
            "error": req["__reason"],
            "error_detail": req["__inference_error__"],
        }

    from ray.data.expressions import col

    checked = prepare_requests(ds, cfg, build_messages, id_column).map(summarize).materialize()
    return checked.filter(expr=col("error") == ""), checked.filter(expr=col("error") != "")
