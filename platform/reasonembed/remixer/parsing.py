"""Parse LLM outputs strictly: generated queries, relevance scores, yes/no answers.

A parser returns ``(value, None)`` or ``(None, reason)``; the reason codes below are what the error tables and
manifests count. Nothing is coerced: an unparseable score is an error row, never a silent -1 (SPEC.md stage 3).
"""

from __future__ import annotations

import re

EMPTY_OUTPUT = "empty_output"
NO_SCORE = "no_score_tag"
BAD_SCORE = "score_not_integer"
SCORE_RANGE = "score_out_of_range"
NOT_YES_NO = "not_yes_no"

_FENCE = re.compile(r"^```[^\n`]*\n(?P<body>[\s\S]*?)\n?```$")
_QUOTES = (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"))
_THINK = re.compile(r"<think>[\s\S]*?</think>", re.IGNORECASE)


def clean_query(text: str) -> str:
    """Strip whitespace, surrounding code fences and surrounding quotes (repeatedly, e.g. a quoted fenced block).

    Inner quotes and fences are content and stay. A leftover ``<think>...</think>`` block (reasoning models) is
    removed first.
    """
    out = _THINK.sub("", text or "").strip()
    while True:
        before = out
        m = _FENCE.match(out)
        if m:
            out = m.group("body").strip()
        for left, right in _QUOTES:
            if len(out) >= 2 and out.startswith(left) and out.endswith(right):
                out = out[len(left):-len(right)].strip()
        if out == before:
            return out


def parse_query(text: str) -> tuple[str | None, str | None]:
    """A cleaned query, or the reason it is unusable."""
    q = clean_query(text)
    return (q, None) if q else (None, EMPTY_OUTPUT)


def parse_score(
    text: str, pattern: str = r"<score>\s*(\d+)\s*</score>", lo: int = 1, hi: int = 5
) -> tuple[int | None, str | None]:
    """The score inside the *last* ``<score>`` tag (the conclusion ends the response), checked against [lo, hi].

    Reasons: ``empty_output``, ``no_score_tag`` (no match; e.g. cut off by max_tokens), ``score_not_integer``,
    ``score_out_of_range``.
    """
    if not text or not text.strip():
        return None, EMPTY_OUTPUT
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None, NO_SCORE
    raw = matches[-1].group(1)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        return None, BAD_SCORE
    if not lo <= value <= hi:
        return None, SCORE_RANGE
    return value, None


def parse_yes_no(text: str) -> tuple[bool | None, str | None]:
    """True for an answer that starts with 'yes', False for 'no' (case-insensitive, punctuation ignored)."""
    words = re.findall(r"[A-Za-z]+", text or "")
    if not words:
        return None, EMPTY_OUTPUT if not (text or "").strip() else NOT_YES_NO
    first = words[0].lower()
    if first == "yes":
        return True, None
    if first == "no":
        return False, None
    return None, NOT_YES_NO
