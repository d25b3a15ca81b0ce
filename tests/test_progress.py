"""Progress lines (reasonembed.progress), quiet logging (reasonembed.job_logging), the demo's console and samples."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reasonembed import job_logging, progress, runtime

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(progress, "_clock", c)
    return c


def test_log_mode_emits_bounded_lines_with_counts_rate_and_eta(monkeypatch, clock):
    monkeypatch.setenv(progress.ENV_MODE, "log")
    out = io.StringIO()
    with progress.step("encode", total=1000, unit="rows", stream=out, interval=10) as p:
        assert p.mode == "log"
        for _ in range(1000):  # 1000 updates over 50 s of (fake) time
            clock.t += 0.05
            p.update(1)
    lines = out.getvalue().splitlines()
    # start + at most one line per 10 s + done, never one per update
    assert 3 <= len(lines) <= 2 + 50 // 10
    events = [progress.parse_line(ln) for ln in lines]
    assert [e.state for e in events][0] == "start" and events[-1].state == "done"
    mid = events[1]
    assert mid.name == "encode" and mid.unit == "rows" and mid.total == 1000 and 0 < mid.n < 1000
    assert "rows/s" in mid.text and "ETA" in mid.text and "%" in mid.text
    assert events[-1].n == 1000 and "done in 50s" in events[-1].text and "20.0 rows/s" in events[-1].text


def test_rate_eta_set_total_reset(monkeypatch, clock):
    monkeypatch.setenv(progress.ENV_MODE, "log")
    p = progress.step("train", total=None, unit="steps", stream=io.StringIO())
    assert p.eta_s is None
    clock.t += 10
    p.update(25)
    assert p.rate == pytest.approx(2.5) and p.eta_s is None
    p.set_total(100)
    assert p.eta_s == pytest.approx(30.0)
    p.set(50)
    assert p.n == 50 and p.eta_s == pytest.approx(10.0)
    p.reset(total=10, unit="tasks")
    assert (p.n, p.total, p.unit) == (0, 10, "tasks")
    p.close(ok=False)
    assert p.closed and p.ok is False


def test_failed_step_says_so(monkeypatch, clock):
    monkeypatch.setenv(progress.ENV_MODE, "log")
    out = io.StringIO()
    with pytest.raises(RuntimeError), progress.step("annotate", total=4, stream=out):
        raise RuntimeError("boom")
    assert progress.parse_line(out.getvalue().splitlines()[-1]).state == "failed"


def test_disabled_mode_prints_nothing_and_still_counts(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV_MODE, "0")
    assert not progress.enabled()
    with progress.step("encode", total=10) as p:
        for _ in range(10):
            p.update()
    assert p.n == 10
    assert list(progress.track(range(3), "x")) == [0, 1, 2]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_bar_mode_draws_one_tqdm_line(monkeypatch):
    monkeypatch.setenv(progress.ENV_MODE, "1")
    out = io.StringIO()
    with progress.step("evaluate", total=10, unit="queries", stream=out) as p:
        assert p.mode == "bar"
        p.update(10)
    text = out.getvalue()
    assert "evaluate" in text and "10/10" in text and "queries" in text
    assert progress._redirect_depth == 0  # console logging restored


def test_default_mode_follows_the_terminal(monkeypatch):
    monkeypatch.delenv(progress.ENV_MODE, raising=False)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress.mode(io.StringIO()) == "log"
    assert progress.mode(Tty()) == "bar"


def test_parse_line_finds_a_prefixed_line():
    line = "[base model] 12:00:11 " + progress.format_line("encode encode/beir/scifact", 3, None, "rows", 2.0)
    ev = progress.parse_line(line)
    assert (ev.name, ev.n, ev.total, ev.unit, ev.state) == ("encode encode/beir/scifact", 3, None, "rows", "update")
    assert progress.parse_line("11:00:14 INFO reasonembed: starting a local Ray cluster") is None
    slow = progress.format_line("train", 2, 4, "steps", 42.0)  # slow steps: no bare "0.0 steps/s"
    assert "0.048 steps/s" in slow and "ETA 42s" in slow


# -- quiet logging ------------------------------------------------------------------------------------------------


def test_job_log_path_creates_nothing(tmp_path):
    path = job_logging.job_log_path("encode", str(tmp_path / "out"), "r1")
    assert path.parent == (tmp_path / "out" / "r1" / "logs").resolve() and path.name.startswith("encode-")
    assert not (tmp_path / "out").exists()
    assert job_logging.job_log_path("encode", "s3://bucket/runs", "r1").parent == Path(tempfile.gettempdir())


def test_quiet_logging_sends_ray_data_to_the_file_not_the_console(ray_local, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(job_logging.VERBOSE_ENV, raising=False)
    path = job_logging.setup_job_logging("encode", str(tmp_path), "r1", verbose=False)
    try:
        assert path is not None and not path.exists()  # created once the job starts real work
        assert "logs:" not in capsys.readouterr().err
        ray = runtime.connect_ray()
        assert path.exists() and capsys.readouterr().err.strip() == f"logs: {path}"
        rows = ray.data.range(50).map_batches(lambda b: {"id": b["id"] * 2}).take_all()
        assert len(rows) == 50
        logging.getLogger("ray.data.test").info("a ray.data info record")
        logging.getLogger("reasonembed.test").info("a reasonembed info record")
        logging.getLogger("vllm.engine").warning("a vllm warning")
    finally:
        job_logging.reset_job_logging()
    console = capsys.readouterr()
    text = path.read_text()
    assert "a ray.data info record" in text and "Starting execution of Dataset" in text
    assert "a vllm warning" in text and "a reasonembed info record" in text
    for noise in ("a ray.data info record", "Starting execution", "ray.data", "a vllm warning"):
        assert noise not in console.out and noise not in console.err
    # reset: Ray Data's own console handler is back
    assert any(type(h).__name__ == "PlainRayHandler" for h in logging.getLogger("ray.data").handlers)
    assert job_logging.log_file() is None


def test_verbose_sets_up_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv(job_logging.VERBOSE_ENV, "1")
    assert job_logging.is_verbose() and job_logging.is_verbose(True)
    assert job_logging.setup_job_logging("encode", str(tmp_path), "r1") is None
    assert job_logging.log_file() is None and not (tmp_path / "r1").exists()
    monkeypatch.setenv(job_logging.VERBOSE_ENV, "0")
    assert not job_logging.is_verbose() and not job_logging.is_verbose(None)


def test_faiss_import_logs_no_failed_avx2_load():
    code = ("from reasonembed.runtime import apply_env_defaults, setup_logging\n"
            "apply_env_defaults(); setup_logging('DEBUG')\nimport faiss\n")
    env = {k: v for k, v in os.environ.items() if k != "FAISS_OPT_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ModuleNotFoundError" not in proc.stderr and "swigfaiss_avx" not in proc.stderr


# -- CLI ----------------------------------------------------------------------------------------------------------


def test_cli_verbose_flag_parses():
    from reasonembed.cli import parse_job_args

    _, overrides, ns = parse_job_args("encode", ["--verbose", "--data", "/x", "engine.actors=2"])
    assert ns.verbose is True and "engine.actors=2" in overrides and "--verbose" not in " ".join(overrides)
    _, _, ns = parse_job_args("evaluate", ["--data", "/x"])
    assert ns.verbose is False


# -- the demo's console and samples -------------------------------------------------------------------------------


def test_step_console_relays_progress_and_keeps_the_full_log(tmp_path, monkeypatch, capsys, clock):
    from reasonembed.workflow import StepConsole

    monkeypatch.setenv(progress.ENV_MODE, "log")
    log = tmp_path / "logs" / "demo-encode.log"
    console = StepConsole("encode", log)
    lines = ["[reasonembed submit] reasonembed-demo-encode-1: RUNNING after 2 s",
             "logs: /runs/demo/logs/encode-1.log",
             "11:00:00 INFO ray.data: something", *[f"noise {i}" for i in range(200)],
             "11:00:01 " + progress.format_line("encode", 0, 600, "rows", 0.0, "start"),
             "11:00:11 " + progress.format_line("encode", 300, 600, "rows", 10.0),
             "11:00:21 " + progress.format_line("encode", 600, 600, "rows", 20.0, "done")]
    for ln in lines:
        clock.t += 1
        console(ln)
    console.close("SUCCEEDED", 42.0)
    assert log.read_text().splitlines() == lines
    err = capsys.readouterr().err
    assert "noise" not in err and "ray.data" not in err
    assert f"[encode] log: {log}" in err and "Ray/vLLM log: /runs/demo/logs/encode-1.log" in err
    assert "[encode] SUCCEEDED in 42 s" in err
    assert console.bar.n == 600 and console.bar.total == 600


def _write_demo_run(root: Path, n_samples: int = 4) -> None:
    from reasonembed.remixer.annotate import SCORE_SCHEMA
    from reasonembed.remixer.format import SAMPLE_SCHEMA

    fmt, ann = root / "synthesize" / "format", root / "synthesize" / "annotate"
    fmt.mkdir(parents=True)
    ann.mkdir(parents=True)
    long_doc = "Vitamin D receptors are expressed in many tissues. " * 40
    samples, scores = [], []
    for i in range(n_samples):
        q = f"q{i}"
        samples.append({
            "sample_id": f"s{i}", "prompt": "Given a claim, retrieve documents", "query": f"Does vitamin D help {i}?",
            "reasoning_query": f"Reasoning about vitamin D {i}: " + "step " * 60, "pos": [long_doc], "neg": ["Short."],
            "train_group_size": 2, "batch_size": 8, "pos_ids": [f"d{i}p"], "neg_ids": [f"d{i}n"], "pos_scores": [4],
            "neg_scores": [1], "query_id": q, "source_doc_id": f"d{i}p", "domain": "scifact", "shard": "00000",
            "n_unscored": 0})
        for doc, score in ((f"d{i}p", 4), (f"d{i}n", 1)):
            scores.append({"pair_id": f"p{q}{doc}", "query_id": q, "doc_id": doc, "rank": 0, "domain": "scifact",
                           "shard": "00000", "score": score, "num_generated_tokens": 5, "truncated": False,
                           "response": f"The document is {'relevant' if score > 2 else 'off topic'}. "
                                       f"<score>{score}</score>"})
    pq.write_table(pa.Table.from_pylist(samples, schema=SAMPLE_SCHEMA), fmt / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(scores, schema=SCORE_SCHEMA), ann / "part-00000.parquet")
    (ann / "_manifest.json").write_text(json.dumps({"stage": "annotate",
                                                    "extra": {"score_histogram": {"1": 4, "4": 4}}}))


def test_print_samples(tmp_path, capsys):
    from reasonembed.workflow import print_samples

    _write_demo_run(tmp_path)
    assert print_samples(str(tmp_path)) == 3
    out = capsys.readouterr().out
    assert "synthesized samples: 3 of 4 (synthesize/format)" in out and "annotator scores (1-5): 1: 4, 4: 4" in out
    assert "Does vitamin D help 0?" in out and "Does vitamin D help 3?" not in out
    assert "+ pos (score 4, doc d0p)" in out and "- neg (score 1, doc d0n)" in out
    assert "The document is relevant. <score>4</score>" in out and "off topic" in out
    assert "…" in out  # the long positive is cut at ~200 characters
    assert max(len(line) for line in out.splitlines()) <= 100
    assert len(out.splitlines()) < 40


def test_print_samples_without_synthesis_prints_nothing(tmp_path, capsys):
    from reasonembed.workflow import print_samples

    assert print_samples(str(tmp_path)) == 0
    assert capsys.readouterr().out == ""
