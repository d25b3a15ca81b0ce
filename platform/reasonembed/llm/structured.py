"""Helpers around structured output: schemas from pydantic models, and parsing generated text back.

Constraining decoding (``StructuredOutputConfig``) guarantees the *prefix* of the output follows the grammar, not
that the output is complete: a row that hits ``max_tokens`` mid-object is still cut off. Parse failures are
therefore data errors of that row, reported with the row id and kept in the error table by the caller.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from reasonembed.config.llm import StructuredOutputConfig

M = TypeVar("M", bound=BaseModel)


class OutputParseError(ValueError):
    """Generated text does not parse as the expected structure. The message names the row and what failed."""


def json_schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """JSON schema of a pydantic model with ``additionalProperties: false`` on every object.

    Closing objects keeps grammar-constrained decoding from inventing keys, which random or small models do.
    """
    schema = model.model_json_schema()

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def json_output(model: type[BaseModel], compact: bool = False) -> StructuredOutputConfig:
    """A ``StructuredOutputConfig`` for a pydantic model (``compact``: no optional whitespace, for tiny models)."""
    return StructuredOutputConfig(json_schema=json_schema_of(model), disable_any_whitespace=compact)


def parse_json_output(text: str, model: type[M] | None = None, row_id: Any = None) -> M | Any:
    """Parse generated JSON; with ``model``, validate it too. Raises :class:`OutputParseError` naming the row."""
    where = f"row {row_id!r}: " if row_id is not None else ""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OutputParseError(f"{where}output is not valid JSON ({exc.msg} at char {exc.pos}): {text[:200]!r}") from exc
    if model is None:
        return value
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise OutputParseError(f"{where}output does not match {model.__name__}: {exc.errors()[:3]}") from exc
