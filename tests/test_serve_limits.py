"""Auth, request limits and overload on real Ray Serve, deployed the way `serve deploy serve/config.yaml` does it
(the controller imports ``reasonembed.serving.http.app:build_app`` and calls it with the config's args)."""

from __future__ import annotations

import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
APP = "re-limits"
KEY = "sk-test-6d1f0c2a9e"
WRONG_KEY = "sk-wrong-77aa31"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(ray_local, tiny_qwen3_path, tmp_path_factory):
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from reasonembed.serving.runner import start_serve, wait_ready

    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text(KEY + "\n")
    port = start_serve("127.0.0.1", free_port())
    raw = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    raw["http_options"]["port"] = port
    (spec,) = raw["applications"]
    spec.update(name=APP, route_prefix="/secure")  # import_path as in the file: the installed package, no PYTHONPATH
    spec["args"] = {
        "app_name": APP,
        "embedder": {"model": str(tiny_qwen3_path), "max_length": 32},
        "auth": {"api_key_file": str(key_file)},
        "limits": {"max_inputs_per_request": 4, "max_chars_per_input": 200, "max_body_bytes": 4096,
                   "overload_status": 429, "retry_after_s": 2, "max_queued_requests": 1},
        # One request at a time per replica, and each waits 1 s for batch company: a burst must overflow.
        "batching": {"wait_timeout_s": 1.0, "token_budget": 256},
        "replica": {"num_cpus": 1, "max_ongoing_requests": 1},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
    }
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(raw), _blocking=False)
    base = f"http://127.0.0.1:{port}/secure"
    ready = wait_ready(base, timeout_s=300)
    yield {"base": base, "ready": ready, "port": port}
    serve.delete(APP)
    serve.shutdown()


def call(service, path: str, body=None, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"content-type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    headers.update(kw.pop("headers", {}))
    if body is None:
        return httpx.get(service["base"] + path, headers=headers, timeout=60)
    content = json.dumps(body).encode() if isinstance(body, dict) else body  # bytes or a chunk generator
    return httpx.post(service["base"] + path, content=content, headers=headers, timeout=60, **kw)


def test_deployed_from_serve_config(service):
    from ray import serve

    status = serve.status().applications[APP]
    assert status.status == "RUNNING"
    assert set(status.deployments) == {"EmbeddingAPI", "EmbeddingModel"}  # the split topology (the default)
    assert service["ready"]["ready"]


def test_every_server_listens_on_loopback_only(service, listening_sockets):
    """Everything this test session started (Ray, Serve's proxy and both deployments' replicas, moto S3) listens on
    loopback; Serve's per-replica gRPC server would bind [::] without serving/loopback.py."""
    listening = listening_sockets(os.getpid())
    assert any(port == service["port"] for _, port in listening)
    assert {ip for ip, _ in listening} <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, sorted(listening)


def test_split_model_handle_equals_http(service):
    """Batch jobs call the model deployment's handle directly (no auth: in-cluster); same vectors as HTTP."""
    import numpy as np
    from ray import serve

    from reasonembed.serving.embedding_engine import EmbedCall

    texts = ["handle path", "a second, longer input for the same batch"]
    reply = serve.get_deployment_handle("EmbeddingModel", app_name=APP).embed.remote(EmbedCall(texts=texts)).result()
    http = call(service, "/v1/embeddings", {"input": texts, "encoding_format": "float"}).json()["data"]
    np.testing.assert_allclose(reply.embeddings, np.array([d["embedding"] for d in http]), atol=1e-6)


def test_api_key_required_except_probes(service):
    for key in (None, WRONG_KEY):
        r = call(service, "/v1/embeddings", {"input": "hello"}, key=key)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
        assert KEY not in r.text and WRONG_KEY not in r.text
        assert call(service, "/v1/models", key=key).status_code == 401
        assert call(service, "/metrics", key=key).status_code == 401
    assert call(service, "/v1/embeddings", b"{broken", key=None).status_code == 401  # auth before parsing
    assert call(service, "/health", key=None).status_code == 200
    assert call(service, "/ready", key=None).status_code == 200
    ok = call(service, "/v1/embeddings", {"input": ["hello", "world"]})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2
    import openai

    client = openai.OpenAI(base_url=service["base"] + "/v1", api_key=KEY, max_retries=0)
    assert len(client.embeddings.create(model=client.models.list().data[0].id, input="hi").data) == 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=service["base"] + "/v1", api_key=WRONG_KEY, max_retries=0).models.list()


def test_limits_return_413(service):
    r = call(service, "/v1/embeddings", {"input": ["a"] * 5})
    assert r.status_code == 413 and r.json()["error"]["param"] == "input"
    r = call(service, "/v1/embeddings", {"input": ["ok", "x" * 201]})
    assert r.status_code == 413 and r.json()["error"]["param"] == "input[1]"
    r = call(service, "/v1/embeddings", {"input": [list(range(201))]})
    assert r.status_code == 413 and r.json()["error"]["param"] == "input[0]"
    r = call(service, "/v1/embeddings", {"input": "y" * 150, "user": "u" * 5000})  # body > 4096 bytes
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit is enforced while streaming
        yield b'{"input": "'
        for _ in range(10):
            yield b"z" * 500
        yield b'"}'

    r = call(service, "/v1/embeddings", chunked())
    assert r.status_code == 413
    r = call(service, "/v1/search", {"query": ["q"] * 5})
    assert r.status_code == 413 and r.json()["error"]["param"] == "query"


def test_search_without_index_is_404(service):
    r = call(service, "/v1/search", {"query": "anything"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_index"


def test_overload_returns_429_with_retry_after_and_recovers(service):
    """A burst larger than replica slots + queue gets 429 + Retry-After; nothing fails, nothing hangs."""
    def one(i: int) -> httpx.Response:
        return call(service, "/v1/embeddings", {"input": f"burst request {i}"})

    with ThreadPoolExecutor(13) as pool:
        burst = pool.map(one, range(12))
        probes = []  # readiness is not liveness: while the model is saturated /ready says 503, /health 200
        for _ in range(20):
            probes.append((call(service, "/health", key=None).status_code,
                           call(service, "/ready", key=None).status_code))
            if probes[-1][1] == 503:
                break
            time.sleep(0.1)
        responses = list(burst)
    assert all(h == 200 for h, _ in probes) and probes[-1][1] == 503, probes
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 1 and codes.count(200) >= 1, codes
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "2" and r.json()["error"]["type"] == "overloaded_error"
    time.sleep(3)  # the admitted requests drain (each waits up to 1 s for batch company)
    assert one(99).status_code == 200


def test_api_key_from_the_launching_process_reaches_replicas(service, tiny_qwen3_path, monkeypatch):
    """On a cluster that is already running, the key is set only in the process that builds and deploys the app:
    the replica processes (started by the cluster's raylet) do not have the variable, yet the service requires it.
    The key travels as a masked constructor argument, so it shows up in no log either."""
    from ray import serve

    from reasonembed.serving.http.app import build_app
    from reasonembed.serving.runner import wait_ready

    name, env_key = "re-envkey", "sk-env-only-3b9c5e"
    monkeypatch.setenv("REASONEMBED_API_KEY", env_key)  # after ray_local started: its processes lack it
    serve.run(build_app({"app_name": name, "embedder": {"model": str(tiny_qwen3_path), "max_length": 32},
                         "batching": {"warmup": False, "token_budget": 256},
                         "replica": {"topology": "fused", "num_cpus": 0.5}}), name=name, route_prefix="/envkey")
    try:
        base = service["base"].replace("/secure", "/envkey")
        wait_ready(base, timeout_s=120)  # /ready is public
        body = {"input": "hello"}
        anonymous = httpx.post(base + "/v1/embeddings", json=body, timeout=60)
        assert anonymous.status_code == 401, anonymous.text
        ok = httpx.post(base + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {env_key}"},
                        timeout=60)
        assert ok.status_code == 200, ok.text
        time.sleep(2)  # let replicas flush their logs
        assert logged(env_key) == []
    finally:
        serve.delete(name)


def logged(*secrets: str) -> list[str]:
    """Ray log files (driver, controller, replicas, runtime-env agent) that contain any of ``secrets``."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return [str(p) for p in logs.rglob("*") if p.is_file() and p.stat().st_size < 50 * 2**20
            and any(s.encode() in p.read_bytes() for s in secrets)]


def test_api_key_never_logged(service):
    call(service, "/v1/embeddings", {"input": "log check"})
    call(service, "/v1/embeddings", {"input": "log check"}, key=WRONG_KEY)
    time.sleep(2)  # let replicas flush their logs
    hits = logged(KEY, WRONG_KEY)
    assert hits == [], f"API key found in logs: {hits}"
