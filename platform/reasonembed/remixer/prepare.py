"""Stage 0, source preparation (the ReasonEmbed paper's ReMixer): read each domain corpus, drop gold documents of
the benchmark's test queries (decontamination, by id and by text: a copy of a gold document under another id is gold
too), drop exact duplicates, keep 200-5000 character documents, optionally ask the LLM whether each one belongs to
the domain, and draw N sources per domain with a seeded sample. The stage's inputs
(:meth:`PrepareStage.own_inputs`) are the fingerprints of the corpus and benchmark files it reads, so an edited
corpus at the same path is refused, not reused.

Outputs:
- ``synthesize/pool/part-<domain>.parquet``: the mining pool (whole domain corpus, deduplicated and, with
  ``apply_to_pool``, decontaminated): ``domain, doc_id, text``;
- ``synthesize/prepare/part-<domain>-<k>.parquet``: the sampled sources, ``domain, doc_id, text, shard``, in
  fixed-size chunks of the doc-id-sorted sample; error rows (unreadable records, domain-filter failures) in
  ``errors/``; the manifest counts every reason a document was left out.

Sampling: ``random.Random(h(seed, domain)).sample(sorted eligible ids, min(N, n))``: the same corpus and seed
always give the same sources, whatever the file order.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from reasonembed.config.llm import LLMEngineConfig, StructuredOutputConfig
from reasonembed.input_fingerprint import files_fingerprint, model_input
from reasonembed.remixer.context import Context
from reasonembed.remixer.ids import row_rng, shard_name
from reasonembed.remixer.llm_stage import LLMTask, run_llm_shards
from reasonembed.remixer.parsing import parse_yes_no
from reasonembed.remixer.prompts import DomainProfile, domain_filter_prompt
from reasonembed.remixer.sources import (
    DomainCorpus,
    contaminated_ids,
    decontamination_files,
    domain_files,
    read_domain,
)
from reasonembed.remixer.stage import Stage, StageResult
from reasonembed.schemas import error_schema, error_table
from reasonembed.storage import StageDir

log = logging.getLogger(__name__)

SOURCE_SCHEMA = pa.schema([("domain", pa.string()), ("doc_id", pa.string()), ("text", pa.string()),
                           ("shard", pa.string())])
POOL_SCHEMA = pa.schema([("domain", pa.string()), ("doc_id", pa.string()), ("text", pa.string())])
ERROR_SCHEMA = error_schema(("domain", pa.string()), ("doc_id", pa.string()))
FILTER_SCHEMA = pa.schema([("domain", pa.string()), ("doc_id", pa.string()), ("keep", pa.bool_())])


def filter_engine(ctx: Context) -> LLMEngineConfig:
    """The generator engine with the domain filter's sampling (and a Yes/No choice when guided)."""
    f = ctx.cfg.prepare.domain_filter
    update = {"sampling": f.sampling}
    if f.guided:
        update["structured_output"] = StructuredOutputConfig(choice=["Yes", "No"])
    return ctx.cfg.generator.model_copy(update=update)


class FilterMessages:
    """Picklable row -> yes/no prompt for the domain filter."""

    def __init__(self, profiles: dict[str, DomainProfile]):
        self.profiles = profiles

    def __call__(self, row: dict) -> str:
        return domain_filter_prompt(self.profiles[row["domain"]], row["text"])


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _dedup(ids: list[str], texts: list[str]) -> tuple[list[int], list[tuple[str, str]]]:
    """Indices kept (smallest doc id per identical text) and (dropped id, kept id) pairs."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        groups.setdefault(_text_hash(t), []).append(i)
    keep, dropped = [], []
    for idx in groups.values():
        idx.sort(key=lambda i: ids[i])
        keep.append(idx[0])
        dropped.extend((ids[i], ids[idx[0]]) for i in idx[1:])
    return sorted(keep), dropped


def gold_mask(ids: list[str], texts: list[str], gold: set[str], gold_texts: set[str]) -> tuple[list[bool], int]:
    """Which documents are gold: by id, or by text (a copy of a gold document under another id, which dedup may
    otherwise keep in its place since it keeps the smallest id of identical texts). Returns (mask, gold by text
    only)."""
    by_id = [d in gold for d in ids]
    mask = [g or _text_hash(t) in gold_texts for g, t in zip(by_id, texts, strict=True)]
    return mask, sum(m and not g for m, g in zip(mask, by_id, strict=True))


def _gold_texts(ctx: Context, gold: set[str]) -> tuple[set[str], dict[str, DomainCorpus]]:
    """Hashes of the texts of the gold documents found in any domain's corpus (decontamination by text), plus the
    corpus read when there is one domain (so it is read once; several domains are read again one at a time)."""
    cfg = ctx.cfg
    hashes: set[str] = set()
    kept: dict[str, DomainCorpus] = {}
    for domain in cfg.data.domains:
        corpus = read_domain(cfg.data, domain, cfg.storage)
        hashes |= {_text_hash(t) for d, t in zip(corpus.ids, corpus.texts, strict=True) if d in gold}
        if len(cfg.data.domains) == 1:
            kept[domain] = corpus
    return hashes, kept


class PrepareStage(Stage):
    """Stage 0 (module docstring): the first stage, so its config hash chains nothing, and its inputs are files."""

    name = "prepare"
    chained = False

    def settings(self, ctx: Context) -> list:
        c = ctx.cfg
        filt = [c.prepare.domain_filter, filter_engine(ctx).model_dump(exclude={"concurrency", "batch_size"})] \
            if c.prepare.domain_filter.enabled else None
        return [c.data, c.prepare.model_dump(exclude={"domain_filter"}), c.seed,
                {d: p.label for d, p in ctx.profiles.items()}, filt]

    def own_inputs(self, ctx: Context) -> dict[str, str]:
        """Fingerprints of what stage 0 reads: every corpus file of every domain, the decontamination benchmark's
        files and (with the domain filter) the generator model. The config hash says how sources are drawn; these
        say from what, so an edited corpus at the same path is never silently reused
        (``reasonembed.input_fingerprint``)."""
        cfg = ctx.cfg
        files = [f for d in cfg.data.domains for f in domain_files(cfg.data, d, cfg.storage)]
        files += [str(f) for f in decontamination_files(cfg.data.decontamination)]
        out = files_fingerprint(files, cfg.storage)
        if cfg.prepare.domain_filter.enabled:
            out.update(model_input(filter_engine(ctx).model))
        return out

    def run(self, ctx: Context) -> StageResult:
        """Write the mining pool (its own stage folder, ``synthesize/pool``), filter and sample the sources."""
        cfg, h = ctx.cfg, ctx.hashes[self.name]
        stage, pool_stage = ctx.stage("prepare"), ctx.stage("pool")
        inputs = self.inputs(ctx)
        pool_stage.begin(h, overwrite=cfg.overwrite, inputs=inputs)
        gold, gold_counts = contaminated_ids(cfg.data.decontamination)
        gold_texts, read = _gold_texts(ctx, gold)
        counts: Counter = Counter()
        errors: list[dict] = []
        eligible: dict[str, list[tuple[str, str]]] = {}
        for domain in cfg.data.domains:
            corpus = read.pop(domain, None) or read_domain(cfg.data, domain, cfg.storage)
            errors += corpus.errors
            eligible[domain] = _eligible(ctx, corpus, gold, gold_texts, counts)
        pool_stage.write_manifest(config_hash=h, rows_in=counts["docs_valid"], rows_out=counts["pool_docs"],
                                  extra={"contaminated_removed": cfg.data.decontamination.apply_to_pool})
        if cfg.prepare.domain_filter.enabled:
            eligible, filter_errors = _domain_filter(ctx, h, eligible, counts, inputs)
            errors += filter_errors
        n_src = 0
        for domain in cfg.data.domains:
            n_src += _write_sources(ctx, stage, domain, eligible[domain])
        # Always written: an empty table removes a stale error file of an earlier attempt.
        stage.write_errors(error_table(sorted(errors, key=lambda e: (e["domain"], e["doc_id"], e["reason"])),
                                       ERROR_SCHEMA), "all")
        return StageResult(rows_in=counts["records_read"], rows_out=n_src, rows_error=len(errors),
                           errors_by_reason=dict(Counter(e["reason"] for e in errors)),
                           extra={**dict(counts), "sampled": n_src, "gold_ids": len(gold),
                                  "gold_ids_by_task": gold_counts})


PREPARE = PrepareStage()


def _eligible(ctx: Context, corpus: DomainCorpus, gold: set[str], gold_texts: set[str],
              counts: Counter) -> list[tuple[str, str]]:
    """Decontaminate and dedup one domain, write its mining pool, and return its (doc id, text) candidates for
    sampling, sorted by id."""
    cfg, pc_ = ctx.cfg, ctx.cfg.prepare
    counts["records_read"] += corpus.records
    counts["docs_valid"] += len(corpus.ids)
    is_gold, by_text = gold_mask(corpus.ids, corpus.texts, gold, gold_texts)
    counts["contaminated"] += sum(is_gold)
    counts["contaminated_by_text"] += by_text
    keep, dropped = _dedup(corpus.ids, corpus.texts) if pc_.dedup else (list(range(len(corpus.ids))), [])
    counts["duplicates"] += len(dropped)
    pool_idx = [i for i in keep if not (is_gold[i] and cfg.data.decontamination.apply_to_pool)]
    ctx.stage("pool").write_part(pa.table({
        "domain": [corpus.domain] * len(pool_idx), "doc_id": [corpus.ids[i] for i in pool_idx],
        "text": [corpus.texts[i] for i in pool_idx]}, schema=POOL_SCHEMA), corpus.domain)
    counts["pool_docs"] += len(pool_idx)
    rows = []
    for i in keep:
        n = len(corpus.texts[i])
        if is_gold[i]:
            continue
        if n < pc_.min_chars:
            counts["too_short"] += 1
        elif n > pc_.max_chars:
            counts["too_long"] += 1
        else:
            rows.append((corpus.ids[i], corpus.texts[i]))
    counts["eligible"] += len(rows)
    return sorted(rows)


def _write_sources(ctx: Context, stage: StageDir, domain: str, eligible: list[tuple[str, str]]) -> int:
    """Draw the domain's sources with its seeded sample and write them in fixed-size shards; returns how many."""
    cfg, pc_ = ctx.cfg, ctx.cfg.prepare
    pool = [d for d, _ in eligible]
    rng = row_rng(pc_.sample_seed if pc_.sample_seed is not None else cfg.seed, "sample", domain)
    chosen = set(rng.sample(pool, min(pc_.n_per_domain, len(pool))))
    picked = [(d, t) for d, t in eligible if d in chosen]
    if not picked:
        log.warning("prepare: domain %s has no eligible source documents", domain)
    for k in range(0, len(picked), pc_.rows_per_shard):
        chunk = picked[k:k + pc_.rows_per_shard]
        s = shard_name(domain, k // pc_.rows_per_shard)
        stage.write_part(pa.table({"domain": [domain] * len(chunk), "doc_id": [d for d, _ in chunk],
                                   "text": [t for _, t in chunk], "shard": [s] * len(chunk)},
                                  schema=SOURCE_SCHEMA), s)
    return len(picked)


def _domain_filter(ctx: Context, h: str, eligible: dict[str, list[tuple[str, str]]], counts: Counter,
                   inputs: dict[str, str]):
    """LLM yes/no per eligible document (its own resumable stage ``synthesize/domain_filter``, made from the same
    inputs as stage 0)."""
    stage = ctx.stage("domain_filter")
    stage.begin(h, overwrite=ctx.cfg.overwrite, inputs=inputs)
    size = ctx.cfg.prepare.rows_per_shard
    recs, shards = [], []
    for domain, rows in eligible.items():
        for k in range(0, max(1, len(rows)), size):
            s = shard_name(domain, k // size)
            shards.append(s)
            recs += [{"row_id": f"{domain}/{d}", "domain": domain, "doc_id": d, "text": t, "shard": s}
                     for d, t in rows[k:k + size]]
    table = pa.Table.from_pylist(recs, schema=pa.schema([("row_id", pa.string()), ("domain", pa.string()),
                                                         ("doc_id", pa.string()), ("text", pa.string()),
                                                         ("shard", pa.string())]))

    def post(shard: str, out: pa.Table):
        keep_rows, errs = [], []
        for r in out.to_pylist():
            if r.get("error"):
                errs.append({"domain": r["domain"], "doc_id": r["doc_id"], "reason": r["error"],
                             "detail": r.get("error_detail") or ""})
                continue
            ok, reason = parse_yes_no(r["generated_text"])
            if reason:
                errs.append({"domain": r["domain"], "doc_id": r["doc_id"], "reason": f"domain_filter_{reason}",
                             "detail": "answer is neither Yes nor No", "raw_text": r["generated_text"]})
            else:
                keep_rows.append({"domain": r["domain"], "doc_id": r["doc_id"], "keep": ok})
        keep_rows.sort(key=lambda r: r["doc_id"])
        errs.sort(key=lambda r: r["doc_id"])
        return pa.Table.from_pylist(keep_rows, schema=FILTER_SCHEMA), error_table(errs, ERROR_SCHEMA)

    # Its error rows are not retried (retry_errors): new verdicts would change the seeded sample, i.e. all of
    # stage 0; redo it with overwrite instead.
    task = LLMTask(filter_engine(ctx), FilterMessages(ctx.profiles), post, id_column="row_id",
                   keep_columns=["domain", "doc_id", "shard"])
    stats = run_llm_shards(stage, table, shards, task, batch_invariant=ctx.cfg.batch_invariant, engines=ctx.engines)
    verdicts = stage.read_parts()
    errors = stage.read_errors().to_pylist()
    keep = set()
    if verdicts.num_rows:
        yes = verdicts.filter(pc.equal(verdicts["keep"], True))
        keep = set(zip(yes["domain"].to_pylist(), yes["doc_id"].to_pylist(), strict=True))
        counts["off_domain"] += verdicts.num_rows - yes.num_rows
    stage.write_manifest(config_hash=h, rows_in=table.num_rows, rows_out=len(keep), rows_error=len(errors),
                         errors_by_reason=dict(Counter(e["reason"] for e in errors)), extra=stats.as_dict())
    return {d: [(i, t) for i, t in rows if (d, i) in keep] for d, rows in eligible.items()}, errors
