"""Acceptance: `serve/launch.py --model minilm --port <p> --index <encode output> --api-key-file <f>` serves on
127.0.0.1:<p> until interrupted (own Ray cluster, real HTTP), then exits 0 on SIGINT; run with the local preset,
whose ONNX Runtime replica must still give the torch Embedder's vectors to 1e-5, and whose direct ingress (the
replica answers on <p> itself, Serve's proxy on proxy_port) must still turn overload into 503 + Retry-After."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_launch_serves_until_interrupted(tmp_path, scifact_dir, listening_sockets):
    from reasonembed.config.embedder import EmbedderConfig
    from reasonembed.index.faiss_index import SearchIndex
    from reasonembed.models.embedder import Embedder

    docs = [json.loads(x) for x in (scifact_dir / "corpus.jsonl").read_text().splitlines()[:30]]
    embedder = Embedder(EmbedderConfig(model="minilm"))
    stage = tmp_path / "run" / "encode"
    SearchIndex.build(embedder.encode([d["text"] for d in docs]), [d["id"] for d in docs],
                      meta={"encoder": embedder.describe()}).save(str(stage / "index"))
    key = tmp_path / "key"
    key.write_text("cli-secret\n")
    port = free_port()
    proxy_port = next(p for p in iter(free_port, None) if p != port)
    log = (tmp_path / "launch.log").open("w")
    proc = subprocess.Popen(
        # The local preset: fused topology, ONNX Runtime backend (exported into a private cache here), no batch wait.
        [sys.executable, str(REPO / "serve" / "launch.py"), "--config", str(REPO / "configs/serve/local-tiny.yaml"),
         "--model", "minilm", "--port", str(port), "--index", str(stage), "--api-key-file", str(key),
         f"proxy_port={proxy_port}", "limits.http_max_queued_requests=4", "replica.max_ongoing_requests=2"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
        # Without the Makefile's RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: launch.py must keep its cluster on loopback
        env={**{k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"},
             "REASONEMBED_CACHE": str(tmp_path / "cache")},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline and "ready on" not in (tmp_path / "launch.log").read_text():
            assert proc.poll() is None, (tmp_path / "launch.log").read_text()[-3000:]
            time.sleep(2)
        assert "ready on" in (tmp_path / "launch.log").read_text()
        auth = {"Authorization": "Bearer cli-secret"}
        assert httpx.post(base + "/v1/embeddings", json={"input": "x"}).status_code == 401
        r = httpx.post(base + "/v1/embeddings", json={"input": docs[0]["text"], "encoding_format": "float"},
                       headers=auth, timeout=60)
        assert r.status_code == 200
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], embedder.encode([docs[0]["text"]])[0],
                                   atol=1e-5)
        hits = httpx.post(base + "/v1/search", json={"query": docs[3]["text"], "top_k": 3, "prompt_name": "document"},
                          headers=auth, timeout=60).json()["data"][0]["hits"]
        assert hits[0]["doc_id"] == docs[3]["id"]
        # Serve's own proxy (moved to proxy_port by direct ingress) routes to the same replica
        via_proxy = httpx.post(f"http://127.0.0.1:{proxy_port}/v1/embeddings", json={"input": docs[0]["text"]},
                               headers=auth, timeout=60)
        assert via_proxy.status_code == 200
        np.testing.assert_allclose(via_proxy.json()["data"][0]["embedding"], r.json()["data"][0]["embedding"],
                                   atol=1e-6)
        assert "direct ingress, Serve proxy on port" in (tmp_path / "launch.log").read_text()
        listening = listening_sockets(proc.pid)
        assert ("127.0.0.1", port) in listening and ("127.0.0.1", proxy_port) in listening
        assert {ip for ip, _ in listening} <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, listening  # all on loopback

        async def burst() -> list[httpx.Response]:  # 64 x 8 long inputs against 2 slots + a queue of 4
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(client.post(base + "/v1/embeddings", headers=auth,
                                                          json={"input": [docs[1]["text"]] * 8}) for _ in range(64)))

        answers = asyncio.run(burst())
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
        assert all(a.headers.get("retry-after") for a in answers if a.status_code == 503)
        assert httpx.post(base + "/v1/embeddings", json={"input": "after"}, headers=auth,
                          timeout=60).status_code == 200  # and it recovers
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(120) == 0
        for url in (base, f"http://127.0.0.1:{proxy_port}"):
            with pytest.raises(httpx.HTTPError):
                httpx.get(url + "/health", timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("value", ["", "  \t"])
def test_empty_api_key_env_is_a_startup_error(tmp_path, value):
    """REASONEMBED_API_KEY set but empty (e.g. ``=$UNSET_VAR``) stops the launch with exit 2 naming the variable,
    before any cluster starts, instead of serving without auth."""
    env = {**os.environ, "REASONEMBED_API_KEY": value}
    proc = subprocess.Popen([sys.executable, str(REPO / "serve" / "launch.py"), "--model", "minilm", "--port",
                             str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # it went on to start a cluster: the bug
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"launch.py started with an empty API key variable:\n{out[-2000:]}")
    assert proc.returncode == 2, out
    assert "REASONEMBED_API_KEY" in out and "empty" in out, out


def test_build_names_a_custom_empty_key_variable_and_logs_auth_state(monkeypatch, caplog):
    """build_app (also what `serve deploy` runs) refuses an empty key variable by its configured name, and says
    plainly in the start-up log whether the service requires a key; the key itself is never logged."""
    from reasonembed.serving.auth import AuthConfigError
    from reasonembed.serving.http import launch
    from reasonembed.serving.http.app import build_app

    args = {"embedder": {"model": "minilm"}, "auth": {"api_key_env": "MY_SERVICE_KEY"}}
    monkeypatch.setenv("MY_SERVICE_KEY", " ")
    with pytest.raises(AuthConfigError, match="MY_SERVICE_KEY"):
        build_app(args)
    monkeypatch.delenv("MY_SERVICE_KEY")
    with caplog.at_level(logging.INFO, logger="reasonembed.serve"):
        build_app(args)
    (open_rec,) = [r for r in caplog.records if "auth:" in r.getMessage()]
    assert open_rec.levelno == logging.WARNING and "no API key" in open_rec.getMessage()
    caplog.clear()
    monkeypatch.setenv("MY_SERVICE_KEY", "sk-cli-log-check")
    with caplog.at_level(logging.INFO, logger="reasonembed.serve"):
        build_app(args)
    assert any("API key required" in r.getMessage() for r in caplog.records)
    assert "sk-cli-log-check" not in caplog.text
    cfg = launch.load_config(launch.parse_args(["--model", "minilm"]))
    assert "NO AUTH" in launch.ready_line(cfg, "http://127.0.0.1:1", {"model": "minilm"}, 1, auth=False)
