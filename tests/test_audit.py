"""`reasonembed audit-annotator` (reasonembed.remixer.audit): AUC, seeded pair sampling, scoring rows, report
writing, config; and ONE slow end-to-end run on real SciFact with the tiny Qwen3 through a real local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from reasonembed.config import job_config_class, load_job_config
from reasonembed.config.audit import AuditJobConfig
from reasonembed.config.base import ConfigError
from reasonembed.data.beir import load_beir_folder
from reasonembed.data.types import Corpus, DataError, Queries, RetrievalTask
from reasonembed.remixer.audit import (
    MISSING_OUTPUT,
    NON_RELEVANT,
    RELEVANT,
    auc,
    render_markdown,
    sample_pairs,
    score_rows,
    scores_png,
    summarize,
)
from reasonembed.remixer.ids import content_hash

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "audit-annotator" / "local-tiny.yaml"


# ---------------------------------------------------------------- AUC


@pytest.mark.parametrize(("rel", "non", "expected"), [
    ([5, 4], [1, 2], 1.0),
    ([1, 2], [4, 5], 0.0),
    ([3, 4], [1, 3], 3.5 / 4),          # 3>1, 3=3 (1/2), 4>1, 4>3
    ([2, 2, 5], [2], (0.5 + 0.5 + 1) / 3),
    ([3, 3, 3], [3, 3], 0.5),            # all equal -> chance
    ([4], [4], 0.5),
])
def test_auc_hand_computed(rel, non, expected):
    value, reason = auc(rel, non)
    assert reason is None and value == pytest.approx(expected)


def test_auc_without_a_class_gives_none_and_a_reason():
    for rel, non, missing in (([], [1, 2], RELEVANT), ([3], [], NON_RELEVANT), ([], [], "relevant and non_relevant")):
        value, reason = auc(rel, non)
        assert value is None and missing in reason


# ---------------------------------------------------------------- pair sampling


def _task() -> RetrievalTask:
    docs = [f"d{i}" for i in range(30)]
    qrels = {"q1": {"d0": 1, "d1": 2, "d2": 0}, "q2": {"d3": 1, "d4": 0, "d5": 0},
             "q3": {"d6": 0}, "q4": {"d7": 1, "missing": 1}}
    return RetrievalTask(name="toy", corpus=Corpus(ids=docs, texts=[f"text {d}" for d in docs]),
                         queries=Queries(ids=["q1", "q2", "q3", "q4"], texts=["a", "b", "c", "d"]), qrels=qrels)


def test_sampling_is_deterministic_and_respects_qrels():
    task = _task()
    pairs = sample_pairs(task, 10, 2, 3, seed=7, domain="toy")
    assert pairs == sample_pairs(task, 10, 2, 3, seed=7, domain="toy")
    assert {p["query_id"] for p in pairs} == {"q1", "q2", "q4"}        # q3 has no relevant doc
    for p in pairs:
        judged = task.qrels[p["query_id"]]
        assert p["pair_id"] == content_hash("pair", p["query_id"], p["doc_id"])
        if p["label"] == RELEVANT:
            assert judged[p["doc_id"]] > 0 and p["qrel"] == judged[p["doc_id"]]
        else:
            assert p["doc_id"] not in judged and p["qrel"] is None   # never judged, not even with score 0
        assert p["doc"] == f"text {p['doc_id']}"
    per_q = {q: [p for p in pairs if p["query_id"] == q] for q in ("q1", "q2", "q4")}
    assert [sum(p["label"] == RELEVANT for p in per_q[q]) for q in ("q1", "q2", "q4")] == [2, 1, 1]
    assert all(sum(p["label"] == NON_RELEVANT for p in v) == 3 for v in per_q.values())
    assert len({p["pair_id"] for p in pairs}) == len(pairs)


def test_sampling_changes_with_seed_and_is_stable_per_query():
    task = _task()
    runs = {s: [p["doc_id"] for p in sample_pairs(task, 10, 1, 5, seed=s)] for s in range(5)}
    assert len({tuple(v) for v in runs.values()}) > 1
    # a query's pairs do not depend on which other queries were drawn
    small = sample_pairs(task, 1, 1, 5, seed=3)
    full = sample_pairs(task, 10, 1, 5, seed=3)
    q = small[0]["query_id"]
    assert small == [p for p in full if p["query_id"] == q]


def test_sampling_without_relevant_queries_is_a_data_error():
    task = _task()
    task.qrels = {"q3": {"d6": 0}}
    with pytest.raises(DataError, match="nothing to audit"):
        sample_pairs(task, 4, 1, 1, seed=0)


def test_sampling_on_real_scifact(scifact_dir):
    task = load_beir_folder(scifact_dir)
    a = sample_pairs(task, 40, 1, 1, seed=42)
    assert a == sample_pairs(task, 40, 1, 1, seed=42)
    assert len(a) == 80 and len({p["query_id"] for p in a}) == 40
    for p in a:
        judged = task.qrels[p["query_id"]]
        assert (p["label"] == RELEVANT) == (p["doc_id"] in judged)
        assert p["label"] == NON_RELEVANT or judged[p["doc_id"]] > 0


# ---------------------------------------------------------------- scoring and report


def _pairs(n_rel: int, n_non: int) -> list[dict]:
    out = []
    for i in range(n_rel + n_non):
        label = RELEVANT if i < n_rel else NON_RELEVANT
        out.append({"pair_id": f"p{i}", "query_id": f"q{i}", "doc_id": f"d{i}", "label": label, "qrel": None,
                    "domain": "scifact", "query": "q", "doc": "d"})
    return out


def test_score_rows_keeps_every_failure_and_summarize_counts_them():
    cfg = AuditJobConfig()
    pairs = _pairs(3, 3)
    gen = [
        {"pair_id": "p0", "generated_text": "ok <score>5</score>", "error": "", "truncated": False},
        {"pair_id": "p1", "generated_text": "<score>3</score> then <score>4</score>", "error": ""},
        {"pair_id": "p2", "generated_text": "", "error": "prompt_too_long", "error_detail": "too long"},
        {"pair_id": "p3", "generated_text": "<score>2</score>", "error": ""},
        {"pair_id": "p4", "generated_text": "<score>9</score>", "error": ""},
        # p5: no row came back
    ]
    rows = score_rows(pairs, gen, cfg)
    assert [r["pair_id"] for r in rows] == [p["pair_id"] for p in pairs]
    assert [r["score"] for r in rows] == [5, 4, None, 2, None, None]
    assert [r["error"] for r in rows] == ["", "", "prompt_too_long", "", "score_out_of_range", MISSING_OUTPUT]
    s = summarize(rows, cfg)
    assert s["pairs"] == 6 and s["parsed"] + s["errors"] == 6 and s["errors"] == 3
    assert s["errors_by_reason"] == {MISSING_OUTPUT: 1, "prompt_too_long": 1, "score_out_of_range": 1}
    rel, non = s["classes"][RELEVANT], s["classes"][NON_RELEVANT]
    assert (rel["parsed"], rel["errors"], rel["mean_score"]) == (2, 1, 4.5)
    assert non["parse_failure_rate"] == pytest.approx(2 / 3) and non["histogram"] == {
        "1": 0, "2": 1, "3": 0, "4": 0, "5": 0}
    assert s["auc"] == 1.0 and s["auc_near_chance"] is False
    assert s["threshold_rule"]["accuracy"] == 1.0 and s["threshold_rule"]["pairs"] == 3


def test_no_parsed_pair_gives_auc_none_with_a_reason_and_a_readable_report():
    cfg = AuditJobConfig()
    rows = score_rows(_pairs(2, 2), [{"pair_id": f"p{i}", "generated_text": "no tag", "error": ""} for i in range(4)],
                      cfg)
    s = summarize(rows, cfg)
    assert s["auc"] is None and "no parsed score" in s["auc_reason"] and s["auc_near_chance"] is None
    assert s["parse_failure_rate"] == 1.0 and s["threshold_rule"]["accuracy"] is None
    report = {**s, "model": {"reference": "m", "resolved": "/m", "sampling": {}},
              "data": {"task": "scifact", "split": "test", "folder": "/d", "queries_sampled": 4,
                       "queries_eligible": 9}, "sampling": {"seed": 1}, "score_range": [1, 5], "wall_s": 1.0}
    md = render_markdown(report)
    assert md.splitlines()[0] == "# Annotator audit: `m` on 4 pairs of `scifact` (test qrels)"
    assert "AUC could not be computed" in md
    assert scores_png(s["classes"], "t")[:8] == b"\x89PNG\r\n\x1a\n"


def test_near_chance_sentence():
    cfg = AuditJobConfig()
    gen = [{"pair_id": f"p{i}", "generated_text": "<score>3</score>", "error": ""} for i in range(4)]
    s = summarize(score_rows(_pairs(2, 2), gen, cfg), cfg)
    assert s["auc"] == 0.5 and s["auc_near_chance"] is True
    report = {**s, "model": {"reference": "m", "resolved": "/m", "sampling": {}},
              "data": {"task": "t", "split": "test", "folder": "/d", "queries_sampled": 4, "queries_eligible": 4},
              "sampling": {"seed": 1}, "score_range": [1, 5], "wall_s": 1.0}
    assert "is near chance (|AUC - 0.5| < 0.05)" in render_markdown(report)


# ---------------------------------------------------------------- config


def test_config_preset_verb_and_flags():
    assert job_config_class("audit-annotator") is AuditJobConfig
    cfg = load_job_config("audit-annotator", PRESET)
    assert cfg.annotator == AuditJobConfig().annotator and cfg.n_queries == 40
    # the annotator, its prompt and the scifact profile are the synthesize preset's: the audit scores what synthesis
    # would
    synth_path = REPO / "configs" / "synthesize" / "local-tiny.yaml"
    synth = yaml.safe_load(synth_path.read_text())
    assert cfg.domain_profile.model_dump(exclude_none=True) == synth["domain_profiles"]["scifact"]
    synth_cfg = load_job_config("synthesize", synth_path)
    assert cfg.annotator == synth_cfg.annotator and cfg.annotate.prompt == synth_cfg.annotate.prompt
    assert AuditJobConfig.FLAGS["model"] == "annotator.model"
    with pytest.raises(ConfigError, match="relevant_min_score"):
        load_job_config("audit-annotator", PRESET, ["relevant_min_score=1"])


def test_cli_flags_map_to_fields():
    from reasonembed.cli import ENTRIES, parse_job_args

    assert ENTRIES["audit-annotator"] == "reasonembed.remixer.audit:run"
    path, overrides, _ = parse_job_args("audit-annotator", ["--config", str(PRESET), "--model", "org/model",
                                                            "--data", "/x/scifact", "n_queries=4"])
    cfg = load_job_config("audit-annotator", path, overrides)
    assert (cfg.annotator.model, cfg.data, cfg.n_queries) == ("org/model", "/x/scifact", 4)


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_audit_end_to_end_on_scifact(ray_local, scifact_dir, tmp_path):
    from reasonembed.remixer.audit import run

    cfg = load_job_config("audit-annotator", PRESET, [
        f"data={scifact_dir}", f"out={tmp_path}", "run_id=e2e", "n_queries=4", "annotator.sampling.max_tokens=48",
        # machinery only: the random-weight tiny model, with a score shape it reaches within 48 tokens
        "annotator.model=tiny-qwen3", "annotator.structured_output.regex='[\\s\\S]{0,24}<score>[1-5]</score>'"])
    report = run(cfg)
    out = tmp_path / "e2e" / "audit"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["pairs"] == report["pairs"] == 8
    assert on_disk["parsed"] + on_disk["errors"] == 8
    assert sum(c["parsed"] + c["errors"] for c in on_disk["classes"].values()) == 8
    assert {c["pairs"] for c in on_disk["classes"].values()} == {4}
    for c in on_disk["classes"].values():
        assert sum(c["histogram"].values()) == c["parsed"] and list(c["histogram"]) == ["1", "2", "3", "4", "5"]
    assert on_disk["auc"] is None or 0.0 <= on_disk["auc"] <= 1.0
    assert on_disk["model"]["reference"] == "tiny-qwen3" and Path(on_disk["model"]["resolved"]).is_dir()
    assert on_disk["sampling"] == {"n_queries": 4, "positives_per_query": 1, "negatives_per_query": 1, "seed": 42}
    assert on_disk["wall_s"] > 0 and on_disk["data"]["queries_sampled"] == 4
    pairs = pq.read_table(out / "pairs.parquet").to_pylist()
    errors = pq.read_table(out / "errors.parquet")
    assert len(pairs) == 8 and errors.num_rows == on_disk["errors"]
    assert all((r["score"] is None) == bool(r["error"]) for r in pairs)
    assert all(r["response"] for r in pairs if r["score"] is not None)
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "report.md").read_text().startswith("# Annotator audit: `tiny-qwen3` on 8 pairs of `scifact`")
