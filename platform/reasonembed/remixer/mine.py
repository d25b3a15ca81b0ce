"""Stage 2, candidate mining (triviality elimination; the ReasonEmbed paper's stage 2).

For each domain: the mining pool (whole domain corpus after dedup/decontamination) and the queries are encoded by
the platform's batch encoder (``reasonembed.index.encode``: a Ray Data actor pool of ``Embedder``s, resumable by
shard) and searched with the platform's FAISS index (``SearchIndex``, exact inner product by default). Candidates
per query (``mine.selection``):

- ``reference`` (default, the paper's reference procedure): hits = top-``search_top_k`` over the pool; take
  hits[:keep], remove the query's source document, then fill the list back to ``keep`` with documents drawn at
  random (seeded by the query id) from the rest of the hits, hits[keep:];
- ``skip_source``: remove the source from the hits first, then take the first ``keep`` (no random draw while hits
  last).
Either way the source is never a candidate, and when the hits run out (a small pool) ``pad_random`` pads with random
pool documents.

Queries are encoded as ``query_format.format(task=<domain retrieval instruction>, query=q)`` (gte-Qwen2 /
ReasonEmbed format, the same as ``Embedder.format_queries``); documents get no instruction.

Output ``synthesize/mine/part-<shard>.parquet``: ``query_id, domain, shard, source_doc_id, candidate_ids,
candidate_scores`` (the retrieval score; null for pool padding), ``n_retrieved`` (candidates from the top ``keep``
hits) and ``n_padded`` (candidates drawn at random: from the rest of the hits, then the pool). One part per source
shard.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from reasonembed.config.encode import CorpusSource, EncodeJobConfig, IndexConfig
from reasonembed.config.synthesize import MineConfig
from reasonembed.input_fingerprint import model_input
from reasonembed.remixer.context import Context
from reasonembed.remixer.generate import QUERIES_REQUIRES, final_queries
from reasonembed.remixer.ids import row_rng
from reasonembed.remixer.stage import POOL_COLUMNS, Stage, StageResult

log = logging.getLogger(__name__)

MINE_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("domain", pa.string()), ("shard", pa.string()), ("source_doc_id", pa.string()),
    ("candidate_ids", pa.list_(pa.string())), ("candidate_scores", pa.list_(pa.float32())),
    ("n_retrieved", pa.int32()), ("n_padded", pa.int32()),
])


def _encode(ctx: Context, name: str, source_tag: str, ids: list[str], texts: list[str]):
    """Encode texts through ``reasonembed.index.encode`` into ``synthesize/<name>``; returns (ids, embeddings, summary).

    ``source_tag`` (upstream hash and output fingerprint) goes into the encode stage's config hash, so new upstream
    rows never reuse stale embeddings.
    """
    from reasonembed.index.encode import load_embeddings
    from reasonembed.index.encode import run as encode_run
    from reasonembed.index.reader import stable_shard

    cfg = ctx.cfg
    table = pa.table({"doc_id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())})

    def build(n_shards: int):
        import ray

        shards = pa.array([stable_shard(i, n_shards) for i in ids], pa.int64())
        full = table.append_column("error", pa.array([""] * len(ids), pa.string())).append_column("shard", shards)
        return ray.data.from_arrow(full)

    enc_cfg = EncodeJobConfig(
        run_id=cfg.run_id, out=cfg.out, seed=cfg.seed, ray=cfg.ray, storage=cfg.storage,
        data=CorpusSource(path=f"reasonembed-synthesize:{name}@{source_tag}"), embedder=cfg.mine.embedder,
        # The pool is searched through its exact FAISS index; query embeddings are only read back, so they get
        # none (encode takes the width from the embedded rows).
        engine=cfg.mine.engine, index=IndexConfig(build=name.startswith("mine_pool/"), kind="flat"),
        stage=f"synthesize/{name}",
        # These encode stages are mine's private caches, keyed by source_tag: one started for other rows is stale
        # and discarded (mine itself only runs after its own reuse/refusal checks passed).
        overwrite=True,
    )
    summary = encode_run(enc_cfg, dataset_builder=build, n_rows=len(ids))
    got_ids, emb = load_embeddings(ctx.run.stage(f"synthesize/{name}"))
    if len(got_ids) != len(ids):
        errs = ctx.run.stage(f"synthesize/{name}").read_errors()
        raise RuntimeError(f"mine: {name}: {len(ids) - len(got_ids)} texts could not be encoded "
                           f"({errs.num_rows} error rows in synthesize/{name}/errors)")
    order = {d: i for i, d in enumerate(got_ids)}
    return emb[[order[i] for i in ids]], summary


def format_query(template: str, instruction: str | None, query: str) -> str:
    """The embedder's query format (``Embedder.format_queries``): the template with the task, or the bare query."""
    return template.format(task=instruction, query=query) if instruction else query


def select_candidates(
    hits: list[tuple[str, float]], source: str, pool_ids: list[str], m: MineConfig, seed: int, query_id: str
) -> tuple[list[str], list[float | None], int]:
    """A query's ``m.keep`` candidates from its hits (best first; ``search_top_k`` + 1 of them, so that removing the
    source still leaves ``search_top_k``), by ``m.selection`` (module docstring), padded from the pool when the hits
    run out and ``m.pad_random``.

    Returns (candidate ids, scores with None for pool padding, number drawn at random).
    """
    if m.selection == "reference":
        ranked = hits[:m.search_top_k]  # the source counts among the top search_top_k, as in the reference
        cand = [(d, s) for d, s in ranked[:m.keep] if d != source]
        rest = [(d, s) for d, s in ranked[m.keep:] if d != source]
        n_top = len(cand)
        cand += row_rng(seed, "rest", query_id).sample(rest, min(m.keep - n_top, len(rest)))
    else:
        cand = [(d, s) for d, s in hits if d != source][:min(m.keep, m.search_top_k)]
        n_top = len(cand)
    ids = [d for d, _ in cand]
    scores: list[float | None] = [float(s) for _, s in cand]
    if m.pad_random and len(ids) < m.keep:
        taken = set(ids) | {source}
        rest_pool = [d for d in pool_ids if d not in taken]
        extra = row_rng(seed, "pad", query_id).sample(rest_pool, min(m.keep - len(ids), len(rest_pool)))
        ids += extra
        scores += [None] * len(extra)
    return ids, scores, len(ids) - n_top


class MineStage(Stage):
    """Stage 2: candidate mining (module docstring)."""

    name = "mine"
    upstream = ("pool", "generate", "reason")
    requires = {**QUERIES_REQUIRES, "pool": POOL_COLUMNS}

    def settings(self, ctx: Context) -> list:
        m = ctx.cfg.mine
        emb = m.embedder.model_dump(exclude={"device", "num_threads", "token_budget", "max_batch_size", "dtype"})
        return [emb, m.model_dump(exclude={"embedder", "engine"}), m.engine.rows_per_shard, ctx.cfg.seed,
                {d: p.retrieval_instruction for d, p in ctx.profiles.items()}]

    def own_inputs(self, ctx: Context) -> dict[str, str]:
        return model_input(ctx.cfg.mine.embedder.model)

    def run(self, ctx: Context) -> StageResult:
        cfg = ctx.cfg
        stage = ctx.stage(self.name)
        queries = final_queries(ctx, self.name)
        done = stage.done_shards()
        pending = [s for s in sorted(ctx.stage("prepare").done_shards()) if s not in done]
        encode_stats: dict = {}
        n_queries = 0
        for domain in cfg.data.domains:
            dom_shards = [s for s in pending if s.rsplit("-", 1)[0] == domain]
            if dom_shards:
                q = queries.filter(pc.equal(queries["domain"], domain))
                encode_stats.update(self._mine_domain(ctx, domain, q, dom_shards))
                n_queries += q.num_rows
        out = stage.read_parts()
        n_cand = int(pc.sum(pc.list_value_length(out["candidate_ids"])).as_py() or 0) if out.num_rows else 0
        n_pad = int(pc.sum(out["n_padded"]).as_py() or 0) if out.num_rows else 0
        pool = ctx.stage("pool")
        return StageResult(rows_in=queries.num_rows, rows_out=out.num_rows, extra={
            "candidates": n_cand, "padded": n_pad, "queries_mined_this_run": n_queries,
            "source_in_candidates": source_in_candidates(out), "encode": encode_stats,
            "pool_sizes": {d: len(pool.read_table(pool.part_name(d))) for d in cfg.data.domains}})

    def _mine_domain(self, ctx: Context, domain: str, q: pa.Table, dom_shards: list[str]) -> dict:
        """Mine the pending shards ``dom_shards`` of one domain from its queries ``q``; returns its encode stats
        (``{domain: ...}``, empty when nothing was encoded)."""
        from reasonembed.index.faiss_index import IndexSpec, SearchIndex

        m = ctx.cfg.mine
        pool = ctx.stage("pool")
        pool_t = self.read_pool(ctx, domain)
        pool_ids = pool_t["doc_id"].to_pylist()
        stats: dict = {}
        # Encode every query of the domain (not only the pending shards'): the encode stage's rows must not depend
        # on where an earlier run stopped.
        if q.num_rows and len(pool_ids):
            # Encode stages are keyed by what they encode (pool: prepare's hash and the pool's output; queries:
            # their stages' hashes and outputs) plus the embedder, so changing e.g. mine.keep reuses the embeddings
            # while a redone or retried upstream (new rows, same config) re-encodes.
            pool_tag = f"{ctx.hashes['prepare']}:{pool.output_fingerprint()}"
            pool_emb, s1 = _encode(ctx, f"mine_pool/{domain}", pool_tag, pool_ids, pool_t["text"].to_pylist())
            instr = m.embedder.query_instruction or ctx.profiles[domain].retrieval_instruction
            texts = [format_query(m.embedder.query_format, instr, x) for x in q["query"].to_pylist()]
            q_tag = ":".join([ctx.hashes.get("reason") or ctx.hashes["generate"], *_query_outputs(ctx)])
            q_emb, s2 = _encode(ctx, f"mine_queries/{domain}", f"{q_tag}:{instr}", q["query_id"].to_pylist(), texts)
            stats[domain] = {"pool": _summary(s1), "queries": _summary(s2)}
            # An exact inner-product FAISS index (IndexFlatIP) over the pool's embeddings, built here: the encode
            # stages keep embeddings only (no index, so s1.index_uri is None).
            index = SearchIndex.build(pool_emb, pool_ids, IndexSpec(kind="flat"))
            # One extra hit, so that skip_source still has search_top_k after removing the source.
            hits = index.search(q_emb, min(m.search_top_k + 1, len(pool_ids)), excluded=None)
        else:
            hits = [[] for _ in range(q.num_rows)]
        _write_candidates(ctx, domain, q, hits, pool_ids, dom_shards)
        return stats


MINE = MineStage()


def _write_candidates(ctx: Context, domain: str, q: pa.Table, hits: list, pool_ids: list[str],
                      dom_shards: list[str]) -> None:
    """Select each query's candidates from its hits and write one part per pending shard of the domain."""
    cfg = ctx.cfg
    rows_by_shard: dict[str, list[dict]] = {s: [] for s in dom_shards}
    for r, hs in zip(q.to_pylist(), hits, strict=True):
        if r["shard"] not in rows_by_shard:
            continue
        ids, scores, n_pad = select_candidates(hs, r["source_doc_id"], pool_ids, cfg.mine, cfg.seed, r["query_id"])
        rows_by_shard[r["shard"]].append({
            "query_id": r["query_id"], "domain": domain, "shard": r["shard"],
            "source_doc_id": r["source_doc_id"], "candidate_ids": ids, "candidate_scores": scores,
            "n_retrieved": len(ids) - n_pad, "n_padded": n_pad})
    stage = ctx.stage("mine")
    for s in dom_shards:
        rows = sorted(rows_by_shard[s], key=lambda x: x["query_id"])
        stage.write_part(pa.Table.from_pylist(rows, schema=MINE_SCHEMA), s)


def _query_outputs(ctx: Context) -> list[str]:
    """Output fingerprints of the stages the queries come from (generate, and reason when enabled)."""
    names = ["generate", "reason"] if ctx.cfg.reasoning.enabled else ["generate"]
    return [ctx.stage(n).output_fingerprint() for n in names]


def source_in_candidates(mine: pa.Table) -> int:
    """How many candidate lists contain their own source document (must be 0)."""
    if mine.num_rows == 0:
        return 0
    return sum(src in cands for src, cands in zip(mine["source_doc_id"].to_pylist(),
                                                   mine["candidate_ids"].to_pylist(), strict=True))


def _summary(s) -> dict:
    return {"rows": s.rows, "tokens": s.tokens, "tokens_per_s": round(s.tokens_per_s, 1),
            "wall_s": round(s.wall_s, 2), "truncated": s.truncated}

