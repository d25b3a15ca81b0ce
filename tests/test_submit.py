"""`reasonembed submit`: offline planning and checks, then real submissions to a private Ray head on 127.0.0.1.

The end-to-end tests use a tests-only entrypoint (written into a temporary working dir) that fails a configured
number of times, counting its runs in a marker file, and so exercises retries, deterministic submission ids, the
retry budget and its error message against a real job API, with the real upload of working dir and package.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from job_scripts import job_script

from reasonembed.cluster_spec import ResourceMismatch, check_resources, find_requests, unsatisfiable
from reasonembed.config import ConfigError
from reasonembed.config.submit import SubmitOptions
from reasonembed.local_head import LocalHead, free_port
from reasonembed.submit import (
    JobFailed,
    SubmitError,
    base_submission_id,
    last_error_line,
    plan,
    submission_id,
    submit,
    submit_cli,
)

REPO = Path(__file__).resolve().parents[1]
AWS = REPO / "cluster" / "aws-gpu.yaml"
KUBE = REPO / "cluster" / "kuberay-rayjob.yaml"
LOCAL = REPO / "cluster" / "local.yaml"

FLAKY = job_script(
    "Tests-only job: fail until this run count passes `fail_times`, counting runs in a marker file.",
    """
    import os
    import reasonembed  # importable on the cluster through the runtime env's py_modules

    marker = cfg["marker"]
    runs = (int(open(marker).read()) if os.path.exists(marker) else 0) + 1
    open(marker, "w").write(str(runs))
    print(f"flaky run {runs} out={cfg['out']} reasonembed={reasonembed.__file__}", flush=True)
    print(f"env REASONEMBED_TEST_TAG={os.environ.get('REASONEMBED_TEST_TAG')}", flush=True)
    if runs <= cfg["fail_times"]:
        raise RuntimeError(f"planned failure {runs} of {cfg['fail_times']}")
    if cfg.get("probe_worker"):
        import ray

        @ray.remote(num_cpus=0)
        def on_worker():
            import reasonembed.data  # a subpackage named like an excluded top-level folder
            return reasonembed.data.__file__, os.path.exists("data"), os.path.exists(".venv")

        ray.init()
        print(f"worker reasonembed.data={ray.get(on_worker.remote())}", flush=True)
    print("flaky done", flush=True)
    """,
)


def make_workdir(root: Path, fail_times: int, run_id: str = "flaky-run", out: str | None = "runs") -> Path:
    """A minimal repository layout: jobs/flaky.py and configs/flaky.yaml, plus things that must not be uploaded."""
    wd = root / "wd"
    (wd / "jobs").mkdir(parents=True, exist_ok=True)
    (wd / "configs").mkdir(exist_ok=True)
    (wd / "jobs" / "flaky.py").write_text(FLAKY)
    cfg = {"run_id": run_id, "marker": str(root / "runs.count"), "fail_times": fail_times}
    if out is not None:
        cfg["out"] = out
    (wd / "configs" / "flaky.yaml").write_text(yaml.safe_dump(cfg))
    # What must not travel: a venv and a top-level data folder. What must: this checkout's library.
    for junk in (".venv", "data"):
        (wd / junk).mkdir(exist_ok=True)
        (wd / junk / "big.bin").write_bytes(b"x" * 1024)
    if not (wd / "platform").exists():
        shutil.copytree(REPO / "platform" / "reasonembed", wd / "platform" / "reasonembed",
                        ignore=shutil.ignore_patterns("__pycache__"))
    return wd


# ---- offline: ids, plan, resource checks, unreachable cluster ------------------------------------------------


def test_submission_ids_are_deterministic_and_safe():
    assert submission_id("paper-v1", "synthesize", 1) == "reasonembed-paper-v1-synthesize-1"
    assert submission_id("paper-v1", "synthesize", 2) == submission_id("paper-v1", "synthesize", 2)
    assert base_submission_id("my run/αβ", "encode") == "reasonembed-my_run_-encode"


def test_plan_builds_entrypoint_runtime_env_and_absolute_out(tmp_path, monkeypatch):
    wd = make_workdir(tmp_path, 0)
    monkeypatch.chdir(wd)
    opts = SubmitOptions(working_dir=str(wd), address="http://127.0.0.1:8265")
    p = plan("flaky", wd / "configs" / "flaky.yaml", ["fail_times=0"], opts)
    # Same machine: the relative out is pinned to the folder the user sees, via an override.
    assert p.overrides == ["fail_times=0", f"out={wd / 'runs'}"]
    assert p.entrypoint == f"python jobs/flaky.py --config configs/flaky.yaml fail_times=0 out={wd / 'runs'}"
    assert p.run_root == f"{wd / 'runs'}/flaky-run"
    env = p.runtime_env
    assert env["working_dir"] == str(wd)
    assert {"/.venv", "/runs", "/data", "/.git"} <= set(env["excludes"])
    assert env["env_vars"]["PYTHONPATH"] == "platform"
    # No cluster spec: Ray's default driver placement, holding no CPU (a 2-CPU local cluster needs both).
    assert p.entrypoint_resources == {} and p.entrypoint_num_cpus == 0


def test_driver_goes_to_driver_nodes_when_the_spec_has_them(tmp_path, monkeypatch):
    wd = make_workdir(tmp_path, 0)
    monkeypatch.chdir(wd)
    p = plan("flaky", wd / "configs" / "flaky.yaml", [], SubmitOptions(working_dir=str(wd), cluster_spec=str(AWS)))
    assert p.entrypoint_resources == {"driver": 1} and p.entrypoint_num_cpus == 1
    p = plan("flaky", wd / "configs" / "flaky.yaml", [], SubmitOptions(working_dir=str(wd), cluster_spec=str(LOCAL)))
    assert p.entrypoint_resources == {} and p.entrypoint_num_cpus == 0
    with pytest.raises(ResourceMismatch, match="entrypoint_resources"):
        plan("flaky", wd / "configs" / "flaky.yaml", [],
             SubmitOptions(working_dir=str(wd), cluster_spec=str(LOCAL), entrypoint_resources={"driver": 1}))


def test_excludes_drop_top_level_folders_but_keep_the_library(tmp_path):
    """Ray's own packager with our excludes: no venv or data folder, but platform/reasonembed/data/ stays."""
    import zipfile

    from ray._private.runtime_env.packaging import _zip_files

    wd = make_workdir(tmp_path, 0)
    _zip_files(str(wd), SubmitOptions().excludes, str(tmp_path / "wd.zip"), include_gitignore=True)
    names = zipfile.ZipFile(tmp_path / "wd.zip").namelist()
    assert "jobs/flaky.py" in names and "configs/flaky.yaml" in names
    assert "platform/reasonembed/data/__init__.py" in names
    assert not any(n.startswith((".venv/", "data/")) or "__pycache__" in n for n in names)


def test_plan_refuses_relative_out_on_a_remote_cluster(tmp_path, monkeypatch):
    wd = make_workdir(tmp_path, 0)
    monkeypatch.chdir(wd)
    opts = SubmitOptions(working_dir=str(wd), address="http://10.1.2.3:8265")
    with pytest.raises(SubmitError, match="out='runs' is a relative local path"):
        plan("flaky", wd / "configs" / "flaky.yaml", [], opts)
    p = plan("flaky", wd / "configs" / "flaky.yaml", ["out=s3://bucket/runs"], opts)
    assert p.run_root == "s3://bucket/runs/flaky-run"


def test_relative_data_paths_are_pinned_locally_and_refused_remotely(tmp_path, monkeypatch):
    """The job runs in an unpacked copy of the working dir: `../corpus` would point nowhere there."""
    wd = make_workdir(tmp_path, 0)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    cfg = wd / "configs" / "flaky.yaml"
    cfg.write_text(cfg.read_text() + "data: {path: ../corpus, format: jsonl}\nmodel: minilm\n")
    monkeypatch.chdir(wd)
    monkeypatch.delenv("REASONEMBED_DATA_DIR", raising=False)
    p = plan("flaky", cfg, [], SubmitOptions(working_dir=str(wd)))
    assert f"data.path={tmp_path / 'corpus'}" in p.overrides
    assert not any(o.startswith(("model=", "data.format=")) for o in p.overrides)  # not paths that exist here
    assert p.runtime_env["env_vars"]["REASONEMBED_DATA_DIR"] == str(tmp_path / "shared" / "data")
    with pytest.raises(SubmitError, match="data.path='../corpus' is a path on this machine"):
        plan("flaky", cfg, ["out=s3://b/runs"], SubmitOptions(working_dir=str(wd), address="http://10.0.0.5:8265"))


def test_plan_rejects_paths_that_would_not_reach_the_cluster(tmp_path):
    wd = make_workdir(tmp_path, 0)
    opts = SubmitOptions(working_dir=str(wd))
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("run_id: x\n")
    with pytest.raises(SubmitError, match="outside the uploaded working dir"):
        plan("flaky", outside, [], opts)
    (wd / "runs").mkdir()
    (wd / "runs" / "c.yaml").write_text("run_id: x\n")
    with pytest.raises(SubmitError, match="runs/c.yaml is excluded from the upload"):
        plan("flaky", wd / "runs" / "c.yaml", [], opts)
    with pytest.raises(SubmitError, match="jobs/nope.py not found"):
        plan("nope", wd / "configs" / "flaky.yaml", [], opts)


def test_plan_validates_a_known_verb_with_its_model(tmp_path):
    wd = make_workdir(tmp_path, 0)
    (wd / "jobs" / "encode.py").write_text("")
    (wd / "configs" / "encode.yaml").write_text("run_id: r\nembeder: {model: minilm}\n")
    with pytest.raises(ConfigError, match="embeder: unknown key"):
        plan("encode", wd / "configs" / "encode.yaml", [], SubmitOptions(working_dir=str(wd)))


STAGES = {
    "run_id": "paper",
    "stages": {
        "generate": {"llm": {"num_gpus": 4, "resources": {"gpu_infer": 4}, "accelerator_type": "H100"}},
        "annotate": {"llm": {"num_gpus": 1, "resources": {"gpu_infer": 1}}},
        "train": {"scaling": {"resources_per_worker": {"GPU": 1, "gpu_train": 1}}},
    },
}


def test_requests_are_found_with_their_sibling_gpus():
    reqs = {r.path: r.bundle for r in find_requests(STAGES)}
    assert reqs["stages.generate.llm.resources"] == {"gpu_infer": 4, "GPU": 4, "accelerator_type:H100": 0.001}
    assert reqs["stages.train.scaling.resources_per_worker"] == {"GPU": 1, "gpu_train": 1}


def test_check_resources_against_the_shipped_specs():
    check_resources(STAGES, AWS)
    check_resources(STAGES, KUBE)
    typo = {"stages": {"annotate": {"llm": {"num_gpus": 1, "resources": {"gpu_infr": 1}}}}}
    with pytest.raises(ResourceMismatch) as err:
        check_resources(typo, AWS)
    msg = str(err.value)
    assert "stages.annotate.llm.resources" in msg and "gpu_infr" in msg and "gpu-infer: {" in msg
    too_big = {"generate": {"resources": {"gpu_infer": 16}}}
    assert "no single node type has enough" in unsatisfiable(too_big, AWS)[0]
    # local.yaml declares no role resources: a cluster-role config is caught before it would hang PENDING.
    assert len(unsatisfiable(STAGES, LOCAL)) == 3


def test_check_resources_reads_ray_start_flags_of_a_local_spec(tmp_path):
    spec = yaml.safe_load(LOCAL.read_text())
    with pytest.raises(ResourceMismatch, match="gpu_infer"):
        check_resources(STAGES, spec)  # as shipped, local.yaml advertises no role resources
    spec["head_start_ray_commands"][0] += """ --resources='{"gpu_infer": 8, "gpu_train": 8}'"""
    assert unsatisfiable(STAGES, spec) == []  # the flag's resources are read: every request now fits
    check_resources(STAGES, spec)


def test_unreachable_address_is_one_clear_line(tmp_path, capsys, monkeypatch):
    wd = make_workdir(tmp_path, 0)
    monkeypatch.chdir(wd)
    port = free_port()  # nothing listens there
    with pytest.raises(SubmitError) as err:
        submit("flaky", wd / "configs" / "flaky.yaml",
               options=SubmitOptions(working_dir=str(wd), address=f"http://127.0.0.1:{port}"))
    msg = str(err.value)
    assert msg.startswith(f"cannot reach the Ray job API at http://127.0.0.1:{port}") and "\n" not in msg
    rc = submit_cli(["flaky", "--config", str(wd / "configs" / "flaky.yaml"), "--working-dir", str(wd),
                     "--address", f"127.0.0.1:{port}"])
    assert rc == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "cannot reach" in err_lines[0]


def test_resource_mismatch_is_caught_before_any_connection(tmp_path, capsys, monkeypatch):
    wd = make_workdir(tmp_path, 0)
    monkeypatch.chdir(wd)
    cfg = wd / "configs" / "flaky.yaml"
    cfg.write_text(cfg.read_text() + "stage: {num_gpus: 1, resources: {gpu_inference: 1}}\n")
    # The address is unreachable too, so an error about resources proves the check ran before connecting.
    rc = submit_cli(["flaky", "--config", str(cfg), "--working-dir", str(wd), "--cluster-spec", str(AWS),
                     "--address", f"http://127.0.0.1:{free_port()}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "stage.resources" in err and "gpu_inference" in err and "cannot reach" not in err


def test_last_error_line_prefers_the_exception():
    logs = "loading\nTraceback (most recent call last):\n  File x\nValueError: row 7: bad score\n\nexiting\n"
    assert last_error_line(logs) == "ValueError: row 7: bad score"
    assert last_error_line("", fallback="exit code 1") == "exit code 1"


# ---- against a real head ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head():
    """A private Ray head (1 CPU) on 127.0.0.1 with its own temp dir; stopped process by process afterwards."""
    h = LocalHead.start(num_cpus=1, object_store_mb=96)
    try:
        yield h
    finally:
        h.stop()
        assert h.processes() == []


@pytest.mark.slow
def test_failed_job_is_retried_with_new_deterministic_ids(head, tmp_path, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setenv("REASONEMBED_TEST_TAG", "passed-through")
    wd = make_workdir(tmp_path, fail_times=2, run_id="retry-run")
    monkeypatch.chdir(wd)
    lines: list[str] = []
    opts = SubmitOptions(working_dir=str(wd), poll_interval_s=0.5, address=head.dashboard_url)
    result = submit("flaky", wd / "configs" / "flaky.yaml", ["probe_worker=true"],
                    opts.model_copy(update={"retries": 2}), echo=lines.append)
    assert result.status == "SUCCEEDED"
    assert result.submission_ids == [submission_id("retry-run", "flaky", n) for n in (1, 2, 3)]
    assert (tmp_path / "runs.count").read_text() == "3"
    log = "\n".join(lines)
    # Logs were followed, failures reported with their exception line, the package came from the upload.
    assert "RuntimeError: planned failure 1 of 2" in log and "flaky run 3" in log and "flaky done" in log
    assert "retry 1/2" in log and "retry 2/2" in log
    assert "env REASONEMBED_TEST_TAG=passed-through" in log
    assert f"out={wd / 'runs'}" in log
    # Driver and workers import the uploaded library (not the venv's editable install); junk did not travel.
    shipped = next(ln for ln in lines if ln.startswith("flaky run 3")).split("reasonembed=")[1]
    assert "runtime_resources" in shipped and shipped.endswith("platform/reasonembed/__init__.py")
    worker = next(ln for ln in lines if ln.startswith("worker reasonembed.data="))
    assert "runtime_resources" in worker and "platform/reasonembed/data/__init__.py" in worker
    assert worker.endswith("False, False)")

    client = JobSubmissionClient(head.dashboard_url)
    statuses = {sid: client.get_job_status(sid).value for sid in result.submission_ids}
    assert list(statuses.values()) == ["FAILED", "FAILED", "SUCCEEDED"]
    info = client.get_job_info(result.submission_id)
    assert info.metadata["reasonembed_run_id"] == "retry-run" and info.metadata["attempt"] == "3"
    assert info.entrypoint.startswith("python jobs/flaky.py --config configs/flaky.yaml probe_worker=true")

    # Submitting the same run again continues the numbering (Ray refuses reused ids) and succeeds at once.
    again = submit("flaky", wd / "configs" / "flaky.yaml",
                   options=opts.model_copy(update={"retries": 0, "follow": False}), echo=lines.append)
    assert again.submission_ids == [submission_id("retry-run", "flaky", 4)] and again.status == "SUCCEEDED"


@pytest.mark.slow
def test_retry_budget_stops_with_the_error_and_the_run_path(head, tmp_path, monkeypatch):
    wd = make_workdir(tmp_path, fail_times=5, run_id="doomed-run")
    monkeypatch.chdir(wd)
    opts = SubmitOptions(working_dir=str(wd), poll_interval_s=0.5, address=head.dashboard_url, retries=1,
                         follow=False)
    with pytest.raises(JobFailed) as err:
        submit("flaky", wd / "configs" / "flaky.yaml", options=opts, echo=lambda line: None)
    msg = str(err.value)
    assert "failed 2 time(s), retry budget (1) used up" in msg
    assert "RuntimeError: planned failure 2 of 5" in msg
    assert f"ray job logs {submission_id('doomed-run', 'flaky', 2)}" in msg
    assert f"{wd / 'runs'}/doomed-run/<stage>/errors/" in msg
    assert (tmp_path / "runs.count").read_text() == "2"  # exactly the budget: 1 try + 1 retry


@pytest.mark.slow
def test_submit_cli_exit_codes_against_a_real_head(head, tmp_path, capsys, monkeypatch):
    wd = make_workdir(tmp_path, fail_times=1, run_id="cli-run")
    monkeypatch.chdir(wd)
    args = ["flaky", "--config", str(wd / "configs" / "flaky.yaml"), "--working-dir", str(wd),
            "--address", head.dashboard_url, "--no-follow"]
    assert submit_cli([*args, "--retries", "0"]) == 1
    assert "failed 1 time(s)" in capsys.readouterr().err
    assert submit_cli([*args, "--retries", "0"]) == 0
    out = capsys.readouterr().out
    assert f"{submission_id('cli-run', 'flaky', 2)} SUCCEEDED" in out
    assert os.path.exists(tmp_path / "runs.count")
