"""The one shape every benchmark loader returns: a ``RetrievalTask``.

A task is a corpus, a set of queries, graded relevance judgements (qrels) and, for BRIGHT, per-query ids that must
be removed from the ranking before scoring. ``validate_task`` checks the parts against each other; the loaders call
it so that every benchmark gets the same checks and the same messages:

- errors (``DataError``), where no honest number can come out: duplicate doc or query ids, an empty corpus, no
  queries, no judgements at all;
- warnings (``DataWarning``, with counts), where evaluation can go on and the counts explain the number: qrels rows
  pointing at doc ids that are not in the corpus (dropped: a judgement on a document nobody can retrieve measures
  the folder, not the model; the warning says how many rows went), queries without judgements (dropped, as
  BEIR/MTEB do; this includes queries whose every judged document was missing), qrels for unknown queries
  (ignored), queries with no relevant document, empty texts, excluded ids that are also gold ids. The counts are
  also kept in ``task.metadata["validation"]`` for the report (e.g. ``qrels_unknown_docs_dropped``).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Benchmark data that cannot be evaluated honestly. The message names the file, field or ids and the fix."""


class DataWarning(UserWarning):
    """Benchmark data with a defect that evaluation can live with; the message gives the count."""


@dataclass
class Corpus:
    """Documents in a fixed order. ``texts[i]`` is the string to embed or index for ``ids[i]``."""

    ids: list[str]
    texts: list[str]
    titles: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Queries:
    """Queries in a fixed order; ``texts`` are the raw queries (the instruction is applied by the embedder).

    ``instructions`` carries per-query instructions from the data itself (a record's ``instruction`` field), for
    benchmarks whose queries each come with their own task description. It is None when no record has one, else
    one entry per query (None where that record has none), so it must be filtered and reordered together with
    ``ids`` and ``texts`` (``select`` does that).
    """

    ids: list[str]
    texts: list[str]
    instructions: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, positions: list[int]) -> Queries:
        """The queries at ``positions``, in that order, with ids, texts and instructions kept aligned."""
        instructions = None if self.instructions is None else [self.instructions[i] for i in positions]
        return Queries([self.ids[i] for i in positions], [self.texts[i] for i in positions], instructions)


@dataclass
class RetrievalTask:
    """A retrieval benchmark task.

    Attributes:
        name: task name, e.g. ``"scifact"``, ``"biology"``, ``"Biology"``.
        corpus: the documents.
        queries: the queries to run (only judged ones, after validation).
        qrels: ``qrels[qid][docid] = relevance`` (int; > 0 is relevant, graded levels are kept).
        excluded_ids: ``excluded_ids[qid]`` = doc ids to drop from that query's ranking before scoring (BRIGHT).
        instruction: the query-side task instruction (None: the model's default).
        benchmark: ``"beir"``, ``"bright"``, ``"r2med"``, ``"impliret"``, ...
        metadata: where the data came from: source (path or hub id), revision, sha256 of files, counts, validation.
    """

    name: str
    corpus: Corpus
    queries: Queries
    qrels: dict[str, dict[str, int]]
    excluded_ids: dict[str, list[str]] = field(default_factory=dict)
    instruction: str | None = None
    benchmark: str = "custom"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def has_corpus(self) -> bool:
        return len(self.corpus) > 0

    def limit_queries(self, n: int) -> RetrievalTask:
        """The same task with only the first ``n`` queries (and their qrels/exclusions); for smoke runs."""
        keep = self.queries.ids[:n]
        keep_set = set(keep)
        return RetrievalTask(
            name=self.name,
            corpus=self.corpus,
            queries=self.queries.select(list(range(len(keep)))),
            qrels={q: dict(v) for q, v in self.qrels.items() if q in keep_set},
            excluded_ids={q: list(v) for q, v in self.excluded_ids.items() if q in keep_set},
            instruction=self.instruction,
            benchmark=self.benchmark,
            metadata={**self.metadata, "limited_to_queries": n},
        )

    def summary(self) -> dict[str, Any]:
        """Counts for logs and reports."""
        n_rel = sum(1 for v in self.qrels.values() for r in v.values() if r > 0)
        return {
            "task": self.name,
            "benchmark": self.benchmark,
            "n_docs": len(self.corpus),
            "n_queries": len(self.queries),
            "n_qrels": sum(len(v) for v in self.qrels.values()),
            "n_relevant": n_rel,
            "n_excluded": sum(len(v) for v in self.excluded_ids.values()),
        }


@dataclass(frozen=True)
class HubOptions:
    """Which Hugging Face hub copy a benchmark loader reads, when it reads the hub at all.

    The three travel together from the caller to ``datasets.load_dataset`` and never affect local folders or row
    files, so they are one argument instead of three on every loader.

    Attributes:
        repo: the hub dataset id (BRIGHT: default ``xlangai/BRIGHT``) or, for benchmarks with one dataset per task,
            the owner they live under (R2MED: default ``R2MED``, read as ``R2MED/<task>``). None: the loader's
            default.
        revision: dataset revision (branch, tag or commit). None: the loader's default (BRIGHT: ``main``; R2MED:
            the revision MTEB pins, so numbers are reproducible).
        cache_dir: ``datasets`` cache folder. None: its default.
    """

    repo: str | None = None
    revision: str | None = None
    cache_dir: str | None = None


def _duplicates(ids: list[str]) -> list[str]:
    return [i for i, c in Counter(ids).items() if c > 1]


# ``_warn`` runs inside one of validate_task's step functions: 1 = _warn, 2 = the step, 3 = validate_task, 4 = the
# loader that called it, where the warning is attributed (as it was before the steps were split out).
_WARN_STACKLEVEL = 4


def _warn(task_name: str, counts: dict[str, int], key: str, n: int, message: str, examples: list[str]) -> None:
    if n <= 0:
        return
    counts[key] = n
    shown = ", ".join(repr(e) for e in examples[:5])
    text = f"{task_name}: {n} {message}" + (f" (e.g. {shown})" if shown else "")
    logger.warning(text)
    warnings.warn(text, DataWarning, stacklevel=_WARN_STACKLEVEL)


def validate_task(task: RetrievalTask, *, require_corpus: bool = True, source: str = "") -> RetrievalTask:
    """Check a task's parts against each other; returns the task with unjudged queries dropped.

    Raises ``DataError`` for duplicate ids, mismatched list lengths, no queries, no judgements, or (when
    ``require_corpus``) an empty corpus. Warns with counts otherwise (see the module docstring). The counts land in
    ``task.metadata["validation"]``.
    """
    where = f" in {source}" if source else ""
    _check_structure(task, require_corpus, where)
    counts: dict[str, int] = {}
    _drop_unknown_docs(task, counts)
    _drop_unjudged_queries(task, counts, where)
    _warn_defects(task, counts)
    # merge: a task validated twice (a corpus added later) keeps what the first pass found and dropped
    task.metadata.setdefault("validation", {}).update(counts)
    return task


def _check_structure(task: RetrievalTask, require_corpus: bool, where: str) -> None:
    """The errors: no honest number can come out of a task with these (module docstring)."""
    name = task.name
    c, q = task.corpus, task.queries
    if len(c.ids) != len(c.texts) or (c.titles is not None and len(c.titles) != len(c.ids)):
        raise DataError(f"{name}: corpus ids/texts/titles have different lengths{where}")
    if len(q.ids) != len(q.texts) or (q.instructions is not None and len(q.instructions) != len(q.ids)):
        raise DataError(f"{name}: query ids/texts/instructions have different lengths{where}")
    dup = _duplicates(c.ids)
    if dup:
        raise DataError(
            f"{name}: {len(dup)} duplicate doc ids{where} (e.g. {dup[:5]}); ids must be unique because runs and "
            "qrels are keyed by id. De-duplicate the corpus file."
        )
    dup = _duplicates(q.ids)
    if dup:
        raise DataError(f"{name}: {len(dup)} duplicate query ids{where} (e.g. {dup[:5]}); de-duplicate the queries.")
    if require_corpus and not c.ids:
        raise DataError(f"{name}: the corpus is empty{where}; nothing can be retrieved.")
    if not q.ids:
        raise DataError(f"{name}: there are no queries{where}.")
    if not task.qrels or not any(task.qrels.values()):
        raise DataError(f"{name}: there are no relevance judgements (qrels){where}; the task cannot be scored.")


def _drop_unknown_docs(task: RetrievalTask, counts: dict[str, int]) -> None:
    """Drop qrels rows whose doc id is not in the corpus, with one counted warning. Skipped while the corpus is
    empty (a queries-only task gets its corpus later and is validated again then)."""
    if not task.corpus.ids:
        return
    doc_set = set(task.corpus.ids)
    unknown = [(q, d) for q, v in task.qrels.items() for d in v if d not in doc_set]
    if not unknown:
        return
    distinct = sorted({d for _, d in unknown})
    _warn(task.name, counts, "qrels_unknown_docs_dropped", len(unknown),
          f"qrels rows point at doc ids that are not in the corpus and were dropped ({len(distinct)} distinct ids)",
          distinct)
    task.qrels = {q: {d: r for d, r in v.items() if d in doc_set} for q, v in task.qrels.items()}


def _drop_unjudged_queries(task: RetrievalTask, counts: dict[str, int], where: str) -> None:
    """Drop queries without judgements and qrels of unknown queries (BEIR/MTEB do the same), with counted warnings;
    a task left with no judged query is an error, since its score would be made up of nothing."""
    name, q = task.name, task.queries
    qid_set = set(q.ids)
    unjudged = [i for i in q.ids if not task.qrels.get(i)]
    _warn(name, counts, "queries_without_qrels", len(unjudged),
          "queries have no relevance judgements and are dropped (BEIR/MTEB convention)", unjudged)
    unknown_q = [i for i in task.qrels if i not in qid_set]
    _warn(name, counts, "qrels_unknown_queries", len(unknown_q),
          "qrels query ids are not among the queries and are ignored", unknown_q)
    if unjudged or unknown_q:
        unjudged_set = set(unjudged)
        keep = [i for i, qid in enumerate(q.ids) if qid not in unjudged_set]
        task.queries = q.select(keep)
        task.qrels = {k: v for k, v in task.qrels.items() if k in qid_set and v}
        task.excluded_ids = {k: v for k, v in task.excluded_ids.items() if k in task.qrels}
    if not task.queries.ids:
        raise DataError(f"{name}: no query has relevance judgements{where}; check that qrels, queries and corpus use "
                        "the same ids.")


def _warn_defects(task: RetrievalTask, counts: dict[str, int]) -> None:
    """The warnings evaluation can live with; each count explains part of the number (module docstring)."""
    name, c = task.name, task.corpus
    no_rel = [k for k, v in task.qrels.items() if not any(r > 0 for r in v.values())]
    _warn(name, counts, "queries_without_relevant_docs", len(no_rel),
          "judged queries have no relevant document (they score 0 on every metric)", no_rel)
    empty_docs = [c.ids[i] for i, t in enumerate(c.texts) if not t or not t.strip()]
    _warn(name, counts, "empty_doc_texts", len(empty_docs), "documents have empty text", empty_docs)
    empty_q = [task.queries.ids[i] for i, t in enumerate(task.queries.texts) if not t or not t.strip()]
    _warn(name, counts, "empty_query_texts", len(empty_q), "queries have empty text", empty_q)
    gold_excluded = [
        f"{k}:{d}" for k, ex in task.excluded_ids.items() for d in set(ex) if task.qrels.get(k, {}).get(d, 0) > 0
    ]
    _warn(name, counts, "excluded_gold_ids", len(gold_excluded),
          "(query, doc) pairs are both excluded and relevant; the doc can never be ranked", gold_excluded)
