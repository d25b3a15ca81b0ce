"""The embedding service on real Ray Serve (127.0.0.1, real HTTP): OpenAI client, equality with batch encoding,
search over an encode job's index, the Serve-handle Ray Data engine, typed errors, fuzzing and load."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reasonembed.config.embedder import EmbedderConfig
from reasonembed.models.embedder import Embedder

REPO = Path(__file__).resolve().parents[1]
APP = "re-test"
N_DOCS = 120


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(EmbedderConfig(model="minilm"))


@pytest.fixture(scope="module")
def corpus(scifact_dir) -> list[dict]:
    rows = [json.loads(x) for x in (scifact_dir / "corpus.jsonl").read_text().splitlines()[:N_DOCS]]
    return [{"id": r["id"], "text": r["text"]} for r in rows]


@pytest.fixture(scope="module")
def encoded(ray_local, corpus, tmp_path_factory):
    """Run the encode job on a SciFact slice: parquet parts + FAISS index (with the texts that search returns, from
    index.store_texts) under <run>/encode."""
    from reasonembed.config.encode import EncodeJobConfig
    from reasonembed.index.encode import run

    root = tmp_path_factory.mktemp("serve-encode")
    src = root / "corpus.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in corpus))
    cfg = EncodeJobConfig.model_validate({
        "run_id": "serve", "out": str(root / "runs"), "data": {"path": str(src), "title_field": None},
        "embedder": {"model": "minilm"}, "engine": {"num_cpus_per_actor": 1, "rows_per_shard": 64},
        "index": {"store_texts": True},
    })
    summary = run(cfg)
    stage = root / "runs" / "serve" / "encode"
    parts = pa.concat_tables([pq.read_table(p) for p in sorted(stage.glob("part-*.parquet"))])
    emb = parts.column("embedding").combine_chunks()
    vectors = emb.values.to_numpy(zero_copy_only=False).reshape(len(parts), -1)
    by_id = dict(zip(parts.column("doc_id").to_pylist(), vectors, strict=True))
    return {"stage": str(stage), "summary": summary, "vectors": by_id}


@pytest.fixture(scope="module")
def service(ray_local, encoded):
    from ray import serve

    from reasonembed.serving.http.app import build_app
    from reasonembed.serving.runner import start_serve, wait_ready

    port = start_serve("127.0.0.1", free_port())
    serve.run(build_app({
        "app_name": APP, "embedder": {"model": "minilm"}, "index": encoded["stage"],
        "prompts": {"scifact": "Given a scientific claim, retrieve documents that support or refute the claim"},
        "batching": {"max_batch_size": 32, "token_budget": 4096, "wait_timeout_s": 0.01},
        # Fused topology (one deployment, as in the local preset); test_serve_limits covers the split one.
        "replica": {"num_cpus": 1, "topology": "fused"}, "limits": {"max_top_k": 50},
    }), name=APP, route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    ready = wait_ready(base, timeout_s=300)
    yield {"base": base, "ready": ready}
    serve.delete(APP)
    serve.shutdown()  # also stops the driver-side handle routers before the session's ray.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(service, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(service["base"] + path, content=content, headers=headers, timeout=60, **kw)


# ---- OpenAI compatibility and equality with batch encoding --------------------------------------------------------
def test_openai_client_float_base64_and_dimensions(service, embedder):
    import openai

    client = openai.OpenAI(base_url=service["base"] + "/v1", api_key="unused", max_retries=0)
    texts = ["Vitamin D deficiency is linked to fractures.", "The moon causes tides."]
    want = embedder.encode(texts)
    default = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64 and decodes it
    as_float = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    for resp in (default, as_float):
        got = np.array([d.embedding for d in resp.data], np.float32)
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert [d.index for d in resp.data] == [0, 1] and resp.model == "minilm"
    ids, _ = embedder.token_ids(texts)
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens == sum(len(x) for x in ids)

    small = client.embeddings.create(model="minilm", input=texts, dimensions=64, encoding_format="float")
    cut = want[:, :64] / np.linalg.norm(want[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(np.array([d.embedding for d in small.data]), cut, atol=1e-5)
    raw = client.embeddings.create(model="minilm", input=texts[0], dimensions=64, encoding_format="base64")
    vec = np.frombuffer(base64.b64decode(raw.data[0].embedding), dtype="<f4")
    np.testing.assert_allclose(vec, cut[0], atol=1e-5)

    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="minilm", input="x", dimensions=385)
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert [m.id for m in client.models.list().data] == ["minilm"]


def test_served_equals_encode_job(service, corpus, encoded):
    """Documents through HTTP == the encode job's parquet embeddings (same code path) to 1e-5."""
    got = []
    for i in range(0, len(corpus), 40):
        r = post(service, "/v1/embeddings", {"input": [d["text"] for d in corpus[i:i + 40]],
                                             "encoding_format": "float"})
        assert r.status_code == 200, r.text
        got += [d["embedding"] for d in r.json()["data"]]
    want = np.stack([encoded["vectors"][d["id"]] for d in corpus])
    np.testing.assert_allclose(np.array(got, np.float32), want, atol=1e-5)


def test_instructions_and_prompt_names(service, embedder):
    q = ["Vitamin D prevents fractures in the elderly."]
    task = "Given a scientific claim, retrieve documents that support or refute the claim"

    def emb(**extra):
        r = post(service, "/v1/embeddings", {"input": q, "encoding_format": "float", **extra})
        assert r.status_code == 200, r.text
        return np.array(r.json()["data"][0]["embedding"], np.float32), r.json()["usage"]["prompt_tokens"]

    by_instruction, n_instr = emb(instruction=task)
    np.testing.assert_allclose(by_instruction, embedder.encode(q, is_query=True, instruction=task)[0], atol=1e-5)
    np.testing.assert_allclose(emb(prompt_name="scifact")[0], by_instruction, atol=1e-6)
    doc, n_doc = emb(prompt_name="document")
    np.testing.assert_allclose(doc, embedder.encode(q)[0], atol=1e-5)
    assert n_instr > n_doc  # the instruction's tokens are counted in usage
    r = post(service, "/v1/embeddings", {"input": q, "prompt_name": "nope"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_name"


def test_token_id_input(service, embedder):
    texts = ["Aspirin reduces the risk of heart attack.", "Smoking causes lung cancer."]
    ids, _ = embedder.token_ids(texts)
    r = post(service, "/v1/embeddings", {"input": ids, "encoding_format": "float"})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array([d["embedding"] for d in r.json()["data"]]), embedder.encode(texts),
                               atol=1e-5)
    one = post(service, "/v1/embeddings", {"input": ids[0], "encoding_format": "float"})
    assert one.json()["usage"]["prompt_tokens"] == len(ids[0])


def test_serve_handle_engine_for_batch_jobs(service, corpus, encoded):
    """Ray Data over the deployment handle gives the encode job's embeddings (one set of replicas for both)."""
    import ray

    from reasonembed.serving.batch_engine import (
        ServedEncoding,
        encoder_mismatch,
        serve_encode,
        served_encoder,
    )

    docs = corpus[:50]
    ds = ray.data.from_items([{"doc_id": d["id"], "text": d["text"], "shard": 0} for d in docs])
    out = serve_encode(ds, ServedEncoding(APP, rows_per_call=8), window_rows=16).take_all()
    got = {r["doc_id"]: r["embedding"] for r in out}
    assert set(got) == {d["id"] for d in docs} and "text" not in out[0]
    for d in docs:
        np.testing.assert_allclose(got[d["id"]], encoded["vectors"][d["id"]], atol=1e-5)
    assert all(r["n_tokens"] > 0 for r in out)
    served = served_encoder(APP)
    assert encoder_mismatch(served, Embedder(EmbedderConfig(model="minilm")).describe()) == []
    assert encoder_mismatch(served, {**served, "pooling": "cls"}) != []


# ---- search -----------------------------------------------------------------------------------------------------
def test_search_matches_direct_faiss(service, corpus, embedder, encoded):
    from reasonembed.index.faiss_index import SearchIndex

    index = SearchIndex.load(encoded["stage"] + "/index")
    queries = ["Vitamin D deficiency and bone health", "cerebral white matter in preterm infants"]
    want = index.search(embedder.encode(queries, is_query=True), 5)
    r = post(service, "/v1/search", {"query": queries, "top_k": 5})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    for row, exp in zip(data, want, strict=True):
        assert [h["doc_id"] for h in row["hits"]] == [d for d, _ in exp]
        np.testing.assert_allclose([h["score"] for h in row["hits"]], [s for _, s in exp], atol=1e-5)
        assert "text" not in row["hits"][0]
    top = want[0][0][0]
    r = post(service, "/v1/search", {"query": queries[0], "top_k": 5, "excluded_ids": [top],
                                     "return_text": True})
    hits = r.json()["data"][0]["hits"]
    assert top not in [h["doc_id"] for h in hits] and len(hits) == 4
    texts = {d["id"]: d["text"] for d in corpus}
    assert all(h["text"] == texts[h["doc_id"]] for h in hits)
    per_query = post(service, "/v1/search", {"query": queries, "top_k": 3, "excluded_ids": [[top], []]}).json()
    assert top not in [h["doc_id"] for h in per_query["data"][0]["hits"]]
    assert per_query["data"][1]["hits"][0]["doc_id"] == want[1][0][0]
    bad = post(service, "/v1/search", {"query": queries, "excluded_ids": [[top]]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "excluded_ids"
    assert post(service, "/v1/search", {"query": "x", "top_k": 51}).json()["error"]["param"] == "top_k"


# ---- liveness, readiness, metrics, batching -----------------------------------------------------------------------
def test_health_ready_and_metrics(service):
    from ray import serve

    assert set(serve.status().applications[APP].deployments) == {"EmbeddingModel"}  # fused: one deployment
    assert httpx.get(service["base"] + "/health").json() == {"status": "alive"}
    ready = httpx.get(service["base"] + "/ready").json()
    assert ready["ready"] and ready["warmup_lengths"] == [8, 64, 256] and ready["index"]["ntotal"] == N_DOCS
    post(service, "/v1/embeddings", {"input": "metrics please"})
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:  # Ray's metrics agent exports every few seconds
        text = httpx.get(service["base"] + "/metrics").text
        if 'ray_reasonembed_requests_total{' in text and "ray_reasonembed_batch_rows_bucket" in text:
            break
        time.sleep(2)
    for name in ("ray_reasonembed_requests_total", "ray_reasonembed_request_latency_ms_bucket",
                 "ray_reasonembed_batch_rows_bucket", "ray_reasonembed_batch_padded_tokens_bucket",
                 "ray_reasonembed_prompt_tokens_total", "ray_reasonembed_model_tokens_total"):
        assert name in text, f"{name} missing from /metrics"
    assert 'endpoint="embeddings"' in text and 'status="200"' in text


def test_auth_off_and_openapi(service):
    """No key configured: requests with or without a bearer token are served; the OpenAPI schema is published."""
    assert post(service, "/v1/embeddings", {"input": "open"}).status_code == 200
    assert post(service, "/v1/embeddings", {"input": "open"}, headers={"Authorization": "Bearer any"}).status_code \
        == 200
    spec = httpx.get(service["base"] + "/openapi.json").json()
    assert {"/v1/embeddings", "/v1/search", "/v1/models", "/health", "/ready"} <= set(spec["paths"])
    assert "EmbeddingRequest" in spec["components"]["schemas"]
    assert "422" not in spec["paths"]["/v1/embeddings"]["post"]["responses"]  # schema errors are 400


def test_concurrent_requests_share_token_budget_batches(service):
    before = httpx.get(service["base"] + "/ready").json()["batch_stats"]
    texts = [f"claim number {i} about vitamin D and bone density " * (1 + i % 5) for i in range(48)]
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda t: post(service, "/v1/embeddings", {"input": t}).status_code, texts))
    assert codes == [200] * 48
    after = httpx.get(service["base"] + "/ready").json()
    stats = after["batch_stats"]
    batches, rows = stats["batches"] - before["batches"], stats["rows"] - before["rows"]
    assert rows == 48 and batches < 48  # concurrent requests were packed together
    assert stats["max_padded_tokens"] <= after["token_budget"] and stats["max_rows"] <= 32


# ---- errors --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, "body"),
    (b"[]", 400, "body"),
    ({"input": 3}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": ["ok", ""]}, 400, "input"),
    ({"input": ["a", 1]}, 400, "input"),
    ({"input": [[1, 2], []]}, 400, "input"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "x", "dimensions": 0}, 400, "dimensions"),
    ({"input": "x", "dimensions": "8"}, 400, "dimensions"),
    ({"input": "x", "truncate": "no"}, 400, "truncate"),
    ({"input": "x", "temperature": 1}, 400, "temperature"),
    ({"input": "x", "instruction": "a", "prompt_name": "query"}, 400, "body"),
    ({"input": [101, 102], "instruction": "task"}, 400, "body"),
    ({"input": [101, 102], "prompt_name": "query"}, 400, "prompt_name"),
    ({"input": [[101, 99999999]]}, 400, "input[0][1]"),
    ({"input": ["ok", "word " * 300], "truncate": False}, 400, "input[1]"),
    ({"input": "x", "dimensions": 4096}, 400, "dimensions"),
    ({"input": "x", "model": "other"}, 404, "model"),
])
def test_bad_requests_get_typed_errors(service, body, status, param):
    r = post(service, "/v1/embeddings", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_schema_errors_are_openai_bad_requests(service):
    """Malformed requests are 400 invalid_request_error, as OpenAI answers them, so the openai client raises
    BadRequestError (what code written against OpenAI catches), with the offending field as its param."""
    import openai

    client = openai.OpenAI(base_url=service["base"] + "/v1", api_key="unused", max_retries=0)
    for kwargs, param in (({"input": []}, "input"), ({"input": "x", "extra_body": {"truncate": "no"}}, "truncate"),
                          ({"input": "x", "extra_body": {"temperature": 1}}, "temperature")):
        with pytest.raises(openai.BadRequestError) as exc:
            client.embeddings.create(model="minilm", **kwargs)
        err = exc.value
        assert err.status_code == 400 and err.type == "invalid_request_error", err.body
        assert err.param == param and err.code == "invalid_schema" and param in err.message
    raw = post(service, "/v1/embeddings", b"{not json")
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}


def test_truncate_default_cuts_and_reports(service):
    r = post(service, "/v1/embeddings", {"input": ["word " * 300, "short"]})
    assert r.status_code == 200 and r.json()["usage"]["truncated_inputs"] == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
fields = st.fixed_dictionaries({}, optional={
    "input": json_values | st.text(max_size=200) | st.lists(st.text(max_size=60), max_size=5)
    | st.lists(st.integers(-5, 40000), max_size=300) | st.lists(st.lists(st.integers(0, 30521), max_size=4),
                                                                 max_size=3),
    "model": st.sampled_from(["minilm", "x"]) | json_values,
    "encoding_format": st.sampled_from(["float", "base64"]) | json_values,
    "dimensions": st.integers(-2, 500) | json_values,
    "instruction": st.text(max_size=30) | json_values,
    "prompt_name": st.sampled_from(["query", "document", "scifact", "zz"]) | json_values,
    "truncate": st.booleans() | json_values,
    "user": json_values,
    "query": json_values | st.text(max_size=50),
    "top_k": st.integers(-3, 100) | json_values,
    "excluded_ids": json_values,
    "return_text": json_values,
})


@given(path=st.sampled_from(["/v1/embeddings", "/v1/search"]), body=fields | json_values)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
def test_fuzzed_requests_never_5xx(service, path, body):
    r = post(service, path, json.dumps(body).encode())
    assert r.status_code < 500, (body, r.status_code, r.text[:300])
    if r.status_code != 200:
        assert r.json()["error"]["message"]


@given(raw=st.binary(max_size=300))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_bytes_never_5xx(service, raw):
    assert post(service, "/v1/embeddings", raw).status_code < 500


# ---- load -----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_load_2000_requests_at_concurrency_16(service, corpus, embedder, scifact_dir, tmp_path):
    """A separate process sends 2,000 requests, 16 at a time: zero 5xx, every vector equals its reference."""
    queries = [json.loads(x)["text"] for x in (scifact_dir / "queries.jsonl").read_text().splitlines()[:92]]
    texts = queries + [d["text"] for d in corpus[:8]]  # mostly short, some full-length: mixed batches
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    np.save(tmp_path / "expect.npy", embedder.encode(texts))
    out = tmp_path / "load.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "serve.py"), "load",
                    "--url", service["base"] + "/v1/embeddings", "--texts", str(tmp_path / "texts.json"),
                    "--expect", str(tmp_path / "expect.npy"), "--requests", "2000", "--concurrency", "16",
                    "--out", str(out)], check=True, timeout=900)
    res = json.loads(out.read_text())
    assert res["statuses"] == {"200": 2000}, res
    assert res["wrong"] == 0, res["wrong_examples"]
