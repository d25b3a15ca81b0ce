"""ReMixer stage reuse and row bookkeeping without an LLM run (issue 13 items 2-5 and the triviality report):

- a complete prepare stage is reused only while the corpus and benchmark files it read are unchanged (through the
  CLI, `stop_after=prepare`, on the real Ray fixture); `--overwrite` redoes it, and the next stage's inputs carry
  prepare's new output fingerprint;
- an LLM stage's shard commit always rewrites the shard's error file (a stale one of an interrupted attempt goes);
- one rule for repeated ids in the generation output (identical repeats dropped, conflicting ones error rows);
- a retry journal replaces error rows exactly once, however often it is applied;
- the report's source check counts source copies in what mine, annotate and format actually wrote.

The LLM paths themselves (retrying through vLLM, a kill between shards) are in test_remixer_pipeline.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from reasonembed import progress
from reasonembed.cli import run_job
from reasonembed.config.base import load_model
from reasonembed.config.llm import LLMEngineConfig
from reasonembed.config.synthesize import SynthesizeJobConfig
from reasonembed.remixer import report
from reasonembed.remixer.annotate import SCORE_SCHEMA
from reasonembed.remixer.context import Context
from reasonembed.remixer.format import SAMPLE_SCHEMA
from reasonembed.remixer.generate import ERROR_SCHEMA, GENERATE, QUERY_SCHEMA, QueryParser, _post_generate
from reasonembed.remixer.llm_stage import (
    INPUT_KEY,
    Collector,
    LLMStageStats,
    LLMTask,
    _commit,
    _journal,
    _retry_stats,
    apply_retries,
    resolve_repeats,
    run_llm_shards,
    with_input_keys,
)
from reasonembed.remixer.mine import MINE_SCHEMA
from reasonembed.remixer.prepare import POOL_SCHEMA, SOURCE_SCHEMA
from reasonembed.remixer.prompts import profile_for
from reasonembed.repeats import CONFLICTING_ID
from reasonembed.storage import StageDir

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "synthesize" / "local-tiny.yaml"


# ---- item 2: inputs, not only config strings, decide reuse ----------------------------------------------------------
@pytest.fixture
def small_corpus(tmp_path, scifact_dir) -> tuple[Path, Path]:
    """(corpus folder, benchmark folder): 30 SciFact documents and a copy of SciFact's qrels."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = (scifact_dir / "corpus.jsonl").read_text().splitlines()[:30]
    (corpus / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "qrels.tsv").write_text((scifact_dir / "qrels.tsv").read_text())
    return corpus, bench


def _synthesize(corpus: Path, bench: Path, out: Path, *extra: str) -> int:
    return run_job("synthesize", ["--config", str(CONFIG), "--data", str(corpus), "--out", str(out),
                                  f"data.decontamination.path={bench}", "stop_after=prepare", *extra])


def test_changed_corpus_is_refused_then_overwrite_redoes(small_corpus, tmp_path, ray_local, capsys):
    corpus, bench = small_corpus
    out = tmp_path / "runs"
    assert _synthesize(corpus, bench, out) == 0
    ctx = Context.open(load_model(SynthesizeJobConfig, CONFIG, [f"out={out}"]))
    prep = ctx.stage("prepare")
    first = prep.read_manifest()
    assert str(corpus / "corpus.jsonl") in first.inputs and str(bench / "qrels.tsv") in first.inputs
    capsys.readouterr()
    assert _synthesize(corpus, bench, out) == 0  # unchanged: reused
    assert json.loads(capsys.readouterr().out)["skipped_stages"] == ["prepare"]
    # One document edited in place, same path and config: refused, naming the file.
    docs = [json.loads(x) for x in (corpus / "corpus.jsonl").read_text().splitlines()]
    gold = {ln.split("\t")[1] for ln in (bench / "qrels.tsv").read_text().splitlines()[1:]}
    edited = next(d for d in docs if str(d["id"]) not in gold)
    edited["text"] += " An edited sentence."
    (corpus / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    capsys.readouterr()
    assert _synthesize(corpus, bench, out) == 2
    err = capsys.readouterr().err
    assert "made from other inputs" in err and f"changed: {corpus / 'corpus.jsonl'}" in err, err
    assert prep.read_manifest() == first  # nothing rewritten
    # --overwrite redoes it from the new text; the next stage's inputs follow prepare's new output.
    assert _synthesize(corpus, bench, out, "--overwrite") == 0
    assert json.loads(capsys.readouterr().out)["skipped_stages"] == []
    again = prep.read_manifest()
    assert again.inputs[str(corpus / "corpus.jsonl")] != first.inputs[str(corpus / "corpus.jsonl")]
    pool = {r["doc_id"]: r["text"] for r in ctx.stage("pool").read_parts().to_pylist()}
    assert pool[str(edited["id"])].endswith("An edited sentence.")
    nxt = GENERATE.inputs(ctx)
    assert nxt["upstream:prepare"] == prep.output_fingerprint() and "model:smollm2-135m" in nxt
    assert prep.output_fingerprint() != StageDir.output_fingerprint(_frozen(prep, first))
    # The benchmark's gold file is an input too.
    with open(bench / "qrels.tsv", "a") as fh:
        fh.write("999999\t4983\t1\n")
    assert _synthesize(corpus, bench, out) == 2
    assert f"changed: {bench / 'qrels.tsv'}" in capsys.readouterr().err


def _frozen(stage: StageDir, manifest) -> StageDir:
    """A stage folder elsewhere holding only ``manifest`` (to take the fingerprint of an earlier output)."""
    other = StageDir(stage.uri + "-before", stage.stage)
    other.write_manifest(manifest)
    return other


# ---- items 3 and 5: shard commits and repeated ids ----------------------------------------------------------------
def _gen_task() -> LLMTask:
    return LLMTask(LLMEngineConfig(model="tiny-qwen3"), None, QueryParser({"scifact": profile_for("scifact")},
                                                                        _post_generate),
                   id_column="gen_id", keep_columns=["domain", "source_doc_id", "shard", "length", "education"],
                   part_id="gen_id", error_id="row_id")


def _requests(rows: list[tuple[str, str, str]]) -> pa.Table:
    """Generation requests (gen_id, shard, text) as generate.generation_requests writes them."""
    return pa.Table.from_pylist([{"gen_id": g, "domain": "scifact", "source_doc_id": f"doc-{g}", "text": t,
                                  "shard": s, "length": "25 words", "education": "college"} for g, s, t in rows])


def _outputs(requests: pa.Table, texts: list[str], errors: list[str] | None = None) -> pa.Table:
    """What reasonembed.llm.generate returns for these requests (keep columns + input key + generation fields)."""
    keyed = with_input_keys(requests)
    rows = []
    for i, r in enumerate(keyed.to_pylist()):
        err = (errors or [""] * len(texts))[i]
        rows.append({k: r[k] for k in ("gen_id", "domain", "source_doc_id", "shard", "length", "education",
                                       INPUT_KEY)} |
                    {"generated_text": "" if err else texts[i], "num_input_tokens": 10,
                     "num_generated_tokens": 0 if err else 5, "truncated": False, "error": err,
                     "error_detail": "engine died" if err else ""})
    return pa.Table.from_pylist(rows)


def test_commit_rewrites_a_stale_error_file(tmp_path, tiny_qwen3_path):
    """A shard redone without errors removes the error rows an interrupted attempt left (rows_out + rows_error ==
    rows_in); here the shard has no rows at all, so no engine is needed."""
    stage = StageDir(str(tmp_path / "generate"), "synthesize/generate")
    stage.begin("h")
    stale = pa.Table.from_pylist([{"row_id": "stale", "domain": "scifact", "source_doc_id": "d", "shard": "s2",
                                   "reason": "engine_error", "detail": "", "raw_text": ""}], schema=ERROR_SCHEMA)
    stage.write_errors(stale, "s2")
    requests = _requests([("g1", "s1", "text one")])
    stage.write_part(pa.Table.from_pylist([], schema=QUERY_SCHEMA), "s1")  # s1 finished before
    stats = run_llm_shards(stage, requests, ["s1", "s2"], _gen_task())
    assert stats.shards_run == 1 and stage.has_shard("s2")
    assert stage.read_errors().num_rows == 0, "the stale error rows of s2 survived its commit"


def test_repeated_ids_follow_one_rule(tmp_path):
    """Identical repeats (a Ray retry) are dropped; the same id with two inputs makes both error rows."""
    requests = _requests([("g1", "s1", "text one"), ("g2", "s1", "text two"), ("g2", "s1", "another text"),
                          ("g3", "s1", "text three")])
    gen = _outputs(requests, ["Claim one.", "Claim two.", "Claim two bis.", "Claim three."])
    # resolve_repeats alone: an identical repeat of g1 is dropped, g2's two inputs become conflict rows
    rows, dropped, conflicts = resolve_repeats(pa.concat_tables([gen, gen.slice(0, 1)]), "gen_id")
    assert (dropped, conflicts) == (1, 2) and rows.num_rows == 4
    assert sorted(r["gen_id"] for r in rows.to_pylist() if r["error"] == CONFLICTING_ID) == ["g2", "g2"]
    # streamed through the collector and committed with generate's own postprocess
    stage = StageDir(str(tmp_path / "generate"), "synthesize/generate")
    stage.begin("h")
    task, stats = _gen_task(), LLMStageStats()
    bar = progress.step("test", total=4)
    col = Collector("test", {"s1": with_input_keys(requests)}, "gen_id", stats,
                    lambda s, t: _commit(stage, s, t, task.postprocess), bar)
    for batch in (gen.slice(0, 2), gen.slice(0, 1), gen.slice(2, 1)):  # g1 arrives twice (Ray task retry)
        col.feed(batch, 1.0)
    assert not stage.has_shard("s1")  # g3 is still out
    col.feed(gen.slice(3, 1), 1.0)
    bar.close()
    assert col.missing() == {} and stats.repeats_dropped == 1 and stats.conflicting_rows == 2
    assert stage.read_parts()["gen_id"].to_pylist() == ["g1", "g3"]
    errors = stage.read_errors().to_pylist()
    assert [(e["row_id"], e["reason"]) for e in errors] == [("g2", CONFLICTING_ID)] * 2


# ---- item 4: a retry journal replaces error rows exactly once --------------------------------------------------------
def test_retry_journal_applies_exactly_once(tmp_path):
    task = _gen_task()
    requests = _requests([("g1", "s1", "text one"), ("g2", "s1", "text two"), ("g3", "s1", "text three")])
    first = _outputs(requests, ["Claim one.", "", ""], ["", "engine_error", "engine_error"])
    stage = StageDir(str(tmp_path / "generate"), "synthesize/generate")
    stage.begin("h")
    _commit(stage, "s1", first, task.postprocess)
    assert stage.read_parts().num_rows == 1 and stage.read_errors().num_rows == 2
    # The retry: g2 now succeeds, g3 fails again.
    retried = _outputs(requests.slice(1, 2), ["Claim two.", ""], ["", "engine_error"])
    _journal(stage, "s1", retried, task)
    for _ in range(2):  # a resumed run re-applies the journal: still no row lost or doubled
        assert stage.read_parts()["gen_id"].to_pylist() == ["g1", "g2"]
        assert stage.read_errors()["row_id"].to_pylist() == ["g3"]
        apply_retries(stage, task)
    stats = LLMStageStats()
    _retry_stats(stage, task, stats)
    assert (stats.rows_retried, stats.rows_recovered, stats.shards_changed) == (2, 1, ["s1"])


# ---- the report's triviality check measures what was written ---------------------------------------------------------
def test_report_counts_source_copies_in_written_rows(tmp_path):
    cfg = SynthesizeJobConfig.model_validate({"out": str(tmp_path), "data": {"domains": ["scifact"]}})
    ctx = Context.open(cfg)
    src_text, other = "the source abstract " * 20, "another abstract " * 20

    def write(stage: str, rows: list[dict], schema: pa.Schema, shard: str = "scifact-00000") -> None:
        ctx.stage(stage).write_part(pa.Table.from_pylist(rows, schema=schema), shard)

    write("prepare", [{"domain": "scifact", "doc_id": "s1", "text": src_text, "shard": "scifact-00000"}],
          SOURCE_SCHEMA)
    write("pool", [{"domain": "scifact", "doc_id": d, "text": t} for d, t in
                   (("s1", src_text), ("s1-copy", src_text), ("c2", other))], POOL_SCHEMA, "scifact")
    base = {"query_id": "q1", "domain": "scifact", "shard": "scifact-00000"}
    # planted: a candidate that is the source's text under another id
    write("mine", [{**base, "source_doc_id": "s1", "candidate_ids": ["c2", "s1-copy"],
                    "candidate_scores": [0.5, 0.4], "n_retrieved": 2, "n_padded": 0}], MINE_SCHEMA)
    write("annotate", [{**base, "pair_id": f"p-{d}", "doc_id": d, "rank": i, "score": 2, "num_generated_tokens": 3,
                        "truncated": False, "response": None} for i, d in enumerate(["c2", "s1-copy"])],
          SCORE_SCHEMA)
    # planted: the source itself as a negative of its own sample
    write("format", [{**base, "sample_id": "x", "prompt": "p", "query": "q", "reasoning_query": "r",
                      "pos": [other], "neg": [src_text], "train_group_size": 16, "batch_size": 8, "pos_ids": ["c2"],
                      "neg_ids": ["s1"], "pos_scores": [4], "neg_scores": [1], "source_doc_id": "s1",
                      "n_unscored": 0}], SAMPLE_SCHEMA)
    got = report.build(ctx)
    assert got["candidates_equal_to_source_by_stage"] == {"mine": 1, "annotate": 1, "format": 1}
    assert got["candidates_equal_to_source"] == 3 and got["source_candidate_fraction"] == 0.5


def test_retry_errors_and_overwrite_are_cli_switches():
    from reasonembed.cli import parse_job_args

    _, overrides, _ = parse_job_args("synthesize", ["--retry-errors", "--data", "/d", "stop_after=prepare"])
    assert "retry_errors=true" in overrides and "data.corpus=/d" in overrides
    assert parse_job_args("synthesize", ["--overwrite"])[1] == ["overwrite=true"]
    assert parse_job_args("synthesize", [])[1] == []  # off unless given
    assert SynthesizeJobConfig().retry_errors is False
