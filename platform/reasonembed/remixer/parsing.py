"""Parse LLM outputs strictly: generated queries, relevance scores, yes/no answers.

A parser returns ``(value, None)`` or ``(None, reason)``; the reason codes below are what the error tables and
manifests count. Nothing is coerced: an unparseable score is an error row, never a silent -1 (the paper's stage 3).
"""

from __future__ import annotations

import json
import re

EMPTY_OUTPUT = "empty_output"
NO_SCORE = "no_score_tag"
BAD_SCORE = "score_not_integer"
SCORE_RANGE = "score_out_of_range"
NOT_YES_NO = "not_yes_no"

_FENCE = re.compile(r"^```[^\n`]*\n(?P<body>[\s\S]*?)\n?```$")
_QUOTES = (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"))
_LEADING_QUOTE = re.compile(r'^["\u201c](?P<body>[^"\u201d]{10,})["\u201d]')
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


def unwrap_json(text: str) -> str:
    """The string inside a JSON object with exactly one string value (``{"query": "..."}``), else ``text``.

    Generators guided by a JSON schema answer in that shape; the query is the value, not the object.
    """
    t = text.strip()
    if not (t.startswith("{") and t.endswith("}")):
        return text
    try:
        obj = json.loads(t)
    except ValueError:
        return text
    values = [v for v in obj.values() if isinstance(v, str)] if isinstance(obj, dict) else []
    return values[0] if len(values) == 1 else text


def strip_lead_in(text: str, labels: tuple[str, ...] = ()) -> str:
    """Remove a leading label the model put before its answer ("Claim: ...", "The scientific claim that ...").

    ``labels`` are the domain's output name and query type (e.g. "scientific claim"); their last word counts too
    ("claim"). Small models (135 M parameters) often open with such a label; the rest is the query. The first
    letter is capitalised after a removal.
    """
    names = {n.strip().lower() for label in labels if label.strip() for n in (label, label.split()[-1])}
    if not names:
        return text
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    pattern = re.compile(rf"^(?:(?:the|a|an|my|new|one|this)\s+)?(?:{alternatives})\s*(?:is\s*:|is\s+that\s+|that\s+|:|-|\u2014)\s*",
                         re.IGNORECASE)
    stripped = pattern.sub("", text, count=1)
    if stripped == text or not stripped:
        return text
    quoted = _LEADING_QUOTE.match(stripped)  # 'The claim is: "X." More words...' -> the quoted claim
    if quoted:
        stripped = quoted.group("body").strip()
    elif stripped[0] in "\"\u201c" and not any(q in stripped[1:] for q in "\"\u201d"):
        stripped = stripped[1:].strip()  # an opening quote the answer never closed (cut at max_tokens)
    return stripped[0].upper() + stripped[1:] if stripped else text


def parse_query(text: str, labels: tuple[str, ...] = ()) -> tuple[str | None, str | None]:
    """A cleaned query (quotes, fences, a JSON wrapper and a leading label removed), or the reason it is unusable."""
    q = clean_query(strip_lead_in(clean_query(unwrap_json(clean_query(text))), labels))
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
