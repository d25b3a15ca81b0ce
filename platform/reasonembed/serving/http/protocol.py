"""Request and response models of the embedding service (OpenAI embeddings API plus search extensions).

``POST /v1/embeddings`` follows https://platform.openai.com/docs/api-reference/embeddings: ``input`` is a string,
a list of strings, a list of token ids or a list of token-id lists; ``encoding_format`` is ``float`` or
``base64``; ``dimensions`` truncates and renormalises (Matryoshka). Extensions: ``instruction`` / ``prompt_name``
turn inputs into instructed queries (``Instruct: {task}\\nQuery: {q}``; documents get no instruction) and
``truncate`` (default true) chooses between cutting over-long inputs and rejecting them.

Types are strict (no "3" for 3, no true for 1) and unknown keys are rejected, so a malformed request gets a 400
``invalid_request_error`` naming the field (as OpenAI answers it) instead of being half-understood.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Input = str | list[str] | list[int] | list[list[int]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _check_text(s: str, where: str) -> None:
    if s == "":
        raise ValueError(f"{where} is an empty string")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from "\ud800" escapes cannot be tokenised
        raise ValueError(f"{where} is not valid Unicode (unpaired surrogate at position {exc.start})") from None


def _input_problem(value: Any) -> str:
    """A one-line reason why ``value`` is not a valid ``input`` (pydantic's union errors list every branch)."""
    expected = "a string, a list of strings, a list of token ids, or a list of token-id lists"
    if isinstance(value, list):
        if not value:
            return "input is an empty list"
        first = value[0]
        kind = str if isinstance(first, str) else list if isinstance(first, list) else int
        for i, v in enumerate(value):
            if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
                return f"input[{i}] is {type(v).__name__}; a token-id list holds only integers"
            if kind is not int and not isinstance(v, kind):
                return f"input[{i}] is {type(v).__name__}; every item must be a {kind.__name__} like input[0]"
            if kind is list:
                if not v:
                    return f"input[{i}] is an empty token-id list"
                for j, t in enumerate(v):
                    if isinstance(t, bool) or not isinstance(t, int):
                        return f"input[{i}][{j}] is {type(t).__name__}; token ids are integers"
    return f"input must be {expected}; got {type(value).__name__}"


class _TaskFields(_Strict):
    model: str | None = Field(None, description="Model id (see /v1/models). Optional here; OpenAI clients send it.")
    instruction: str | None = Field(
        None,
        description="Embed the inputs as queries with this task instruction: 'Instruct: {task}\\nQuery: {q}'.",
    )
    prompt_name: str | None = Field(
        None,
        description="Named instruction: 'query' (the model's configured query instruction), 'document'/'passage' "
        "(no instruction), or a name from the service's prompts config.",
    )

    @model_validator(mode="after")
    def _one_task(self):
        if self.instruction is not None and self.prompt_name is not None:
            raise ValueError("send either instruction or prompt_name, not both")
        return self


class EmbeddingRequest(_TaskFields):
    """POST /v1/embeddings."""

    input: Input = Field(description="Text(s) or token-id list(s) to embed.")
    encoding_format: Literal["float", "base64"] = Field("float", description="float lists or base64 float32 bytes.")
    dimensions: int | None = Field(None, ge=1, description="Keep the first N dimensions and renormalise.")
    user: str | None = Field(None, description="End-user id (accepted for OpenAI compatibility; not stored).")
    truncate: bool = Field(True, description="Cut inputs over the model's max length (false: reject with 400).")

    @field_validator("input", mode="wrap")
    @classmethod
    def _input(cls, value, handler):
        try:
            out = handler(value)
        except ValidationError:
            raise ValueError(_input_problem(value)) from None
        if isinstance(out, list) and not out:
            raise ValueError("input is an empty list")
        if isinstance(out, str):
            _check_text(out, "input")
        elif isinstance(out[0], str):
            for i, s in enumerate(out):
                _check_text(s, f"input[{i}]")
        elif isinstance(out[0], list) and any(not row for row in out):
            raise ValueError(_input_problem(value))
        return out

    @model_validator(mode="after")
    def _ids_have_no_instruction(self):
        is_ids = isinstance(self.input, list) and not isinstance(self.input[0], str)
        if is_ids and self.instruction is not None:
            raise ValueError("instruction cannot be applied to token-id input (format the query before tokenising)")
        return self

    def texts(self) -> list[str] | None:
        if isinstance(self.input, str):
            return [self.input]
        return self.input if isinstance(self.input[0], str) else None

    def token_ids(self) -> list[list[int]] | None:
        if isinstance(self.input, str) or isinstance(self.input[0], str):
            return None
        return self.input if isinstance(self.input[0], list) else [self.input]


class SearchRequest(_TaskFields):
    """POST /v1/search: embed queries and search the loaded FAISS index."""

    query: str | list[str] = Field(description="Query text(s).")
    top_k: int = Field(10, ge=1, description="Hits per query (at most limits.max_top_k).")
    excluded_ids: list[str] | list[list[str]] | None = Field(
        None,
        description="Doc ids removed from the hits after retrieval: one list for all queries, or one list per query.",
    )
    return_text: bool = Field(False, description="Include document texts (when the index has texts.parquet).")

    @field_validator("query")
    @classmethod
    def _query(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("query is an empty list")
            for i, s in enumerate(value):
                _check_text(s, f"query[{i}]")
        else:
            _check_text(value, "query")
        return value

    def queries(self) -> list[str]:
        return [self.query] if isinstance(self.query, str) else list(self.query)


# ---- responses (documented in the OpenAPI schema; routes write the same shapes as JSON bytes) ------------------
class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens fed to the model (after instruction formatting and truncation).")
    total_tokens: int = Field(description="Same as prompt_tokens (embeddings generate nothing).")
    truncated_inputs: int = Field(0, description="Inputs cut to the model's max length (extension).")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="float list, or base64 of little-endian float32 bytes.")


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class SearchHit(BaseModel):
    doc_id: str
    score: float = Field(description="Inner product of unit vectors (cosine).")
    text: str | None = None


class SearchResult(BaseModel):
    index: int = Field(description="Position of the query in the request.")
    hits: list[SearchHit]


class SearchResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[SearchResult]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "reasonembed"
    dim: int
    max_length: int
    pooling: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
