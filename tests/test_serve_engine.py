"""Serving library without Serve: engine policies, token-budget chunks, vectors, auth, gate, search, config, CLI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reasonembed.config.base import ConfigError, load_model
from reasonembed.config.embedder import EmbedderConfig
from reasonembed.config.serve import AuthConfig, BatchingConfig, ServeJobConfig, config_from_args
from reasonembed.serving.auth import AuthConfigError, bearer_ok, load_api_key
from reasonembed.serving.embedding_engine import Chunk, EmbedCall, EmbeddingEngine
from reasonembed.serving.errors import ContextLengthExceeded, InvalidRequest, Overloaded
from reasonembed.serving.gate import GateSettings, RequestGate
from reasonembed.serving.vectors import from_base64, matryoshka, to_base64, wire_vectors

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def minilm_engine():
    return EmbeddingEngine(EmbedderConfig(model="minilm"), BatchingConfig(max_batch_size=8, token_budget=1024))


@pytest.fixture(scope="module")
def qwen_engine(tiny_qwen3_path):
    cfg = EmbedderConfig(model=str(tiny_qwen3_path), max_length=32, query_instruction="Find the doc")
    return EmbeddingEngine(cfg, BatchingConfig(token_budget=256))


# ---- engine ---------------------------------------------------------------------------------------------------
def test_engine_embeds_like_the_embedder(minilm_engine):
    texts = ["a cat sat on the mat", "quantum chromodynamics " * 80, "x"]
    reply = minilm_engine.embed(EmbedCall(texts=texts))
    direct = minilm_engine.embedder.encode(texts)
    np.testing.assert_allclose(reply.embeddings, direct, atol=1e-5)
    assert reply.truncated == [False, True, False]
    assert reply.n_tokens[1] == minilm_engine.embedder.max_length


def test_queries_get_the_instruction_template(qwen_engine):
    q = ["what causes tides?"]
    got = qwen_engine.embed(EmbedCall(texts=q, is_query=True)).embeddings
    np.testing.assert_allclose(got, qwen_engine.embedder.encode(q, is_query=True), atol=1e-5)
    formatted = qwen_engine.embedder.encode(["Instruct: Find the doc\nQuery: what causes tides?"])
    np.testing.assert_allclose(got, formatted, atol=1e-5)
    other = qwen_engine.embed(EmbedCall(texts=q, is_query=True, instruction="Retrieve proofs")).embeddings
    assert not np.allclose(got, other)


def test_truncate_false_rejects_over_length_naming_the_input(minilm_engine):
    with pytest.raises(ContextLengthExceeded) as err:
        minilm_engine.prepare(EmbedCall(texts=["short", "word " * 400], truncate=False))
    assert err.value.param == "input[1]" and err.value.status == 400 and "256" in err.value.message
    ids, flags = minilm_engine.prepare(EmbedCall(texts=["short", "word " * 400], truncate=True))
    assert flags == [False, True] and len(ids[1]) == 256


def test_token_id_inputs_match_text_inputs(minilm_engine, qwen_engine):
    for engine in (minilm_engine, qwen_engine):
        texts = ["the mitochondria is the powerhouse", "tides come from the moon"]
        ids, _ = engine.embedder.token_ids(texts)
        by_ids = engine.embed(EmbedCall(ids=ids)).embeddings
        np.testing.assert_allclose(by_ids, engine.embed(EmbedCall(texts=texts)).embeddings, atol=1e-5)
    # last-token pooling: a missing EOS is appended, as for texts
    ids, _ = qwen_engine.embedder.token_ids(["hello there"])
    no_eos = [ids[0][:-1]]
    assert qwen_engine.prepare(EmbedCall(ids=no_eos))[0] == ids


def test_token_id_truncation_keeps_trailing_special(minilm_engine):
    row = minilm_engine.embedder.tokenizer("word " * 400, truncation=False)["input_ids"]
    (cut,), (flag,) = minilm_engine.prepare(EmbedCall(ids=[row]))
    text_ids, _ = minilm_engine.embedder.token_ids(["word " * 400])
    assert flag and cut == text_ids[0]
    with pytest.raises(ContextLengthExceeded):
        minilm_engine.prepare(EmbedCall(ids=[row], truncate=False))


@pytest.mark.parametrize("bad", [[-1], [10**9], [5, 30522]])
def test_token_ids_out_of_vocabulary_are_400(minilm_engine, bad):
    with pytest.raises(InvalidRequest) as err:
        minilm_engine.prepare(EmbedCall(ids=[[101, 102], bad]))
    assert err.value.param.startswith("input[1][")


@given(lengths=st.lists(st.integers(1, 256), min_size=1, max_size=60))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_plan_chunks_partition_inputs_within_budget(minilm_engine, lengths):
    ids = [[7] * n for n in lengths]
    plan = minilm_engine.plan(ids)
    assert sorted(i for chunk in plan for i in chunk) == list(range(len(ids)))
    for idx in plan:
        chunk = Chunk([ids[i] for i in idx])
        assert minilm_engine.chunk_cost([chunk]) <= minilm_engine.token_budget
        assert len(idx) <= minilm_engine.max_rows


def test_chunk_cost_is_padded_size_and_row_limit(minilm_engine):
    a, b = Chunk([[1] * 10] * 3), Chunk([[1] * 100])
    assert minilm_engine.chunk_cost([a, b]) == 4 * 100
    many = [Chunk([[1] * 2]) for _ in range(minilm_engine.max_rows + 1)]
    assert minilm_engine.chunk_cost(many) > minilm_engine.token_budget


def test_budget_below_max_length_is_refused():
    with pytest.raises(ValueError, match="token_budget"):
        EmbeddingEngine(EmbedderConfig(model="minilm"), BatchingConfig(token_budget=128))


def test_warmup_marks_ready(tiny_qwen3_path):
    engine = EmbeddingEngine(EmbedderConfig(model=str(tiny_qwen3_path), max_length=32), BatchingConfig())
    assert not engine.status.ready
    status = engine.warmup()
    assert status.ready and status.warmup_lengths == [8, 32]


def test_forward_executor_merges_waiting_batches_within_budget(tiny_qwen3_path):
    """While one pass runs, later batches queue; the next pass takes all of them that fit the token budget."""
    from reasonembed.serving.batcher import ForwardExecutor

    engine = EmbeddingEngine(EmbedderConfig(model=str(tiny_qwen3_path), max_length=32),
                             BatchingConfig(token_budget=64, max_batch_size=4))
    passes = []
    executor = ForwardExecutor(engine, passes.append)
    batches = [[Chunk([[100 + i] * 16])] for i in range(7)]  # 16 tokens each: the budget fits 4 per pass

    async def go():
        return await asyncio.gather(*(executor.submit(b) for b in batches))

    out = asyncio.run(go())
    want = engine.embedder.encode_ids([b[0].ids[0] for b in batches]).embeddings
    np.testing.assert_allclose(np.concatenate([o[0] for o in out]), want, atol=1e-5)
    assert [p.rows for p in passes] == [4, 3]  # merged, in order, never over budget
    assert all(p.padded_tokens <= 64 for p in passes)


# ---- vectors --------------------------------------------------------------------------------------------------
def test_matryoshka_truncates_and_renormalises():
    x = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    y = matryoshka(x, 4)
    assert y.shape == (3, 4)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(y * np.linalg.norm(x[:, :4], axis=1, keepdims=True), x[:, :4], atol=1e-6)
    assert matryoshka(x, None) is x


def test_base64_is_little_endian_float32():
    v = np.array([1.5, -2.25, 3e-8], np.float32)
    assert np.array_equal(from_base64(to_base64(v)), v)
    assert wire_vectors(v[None], "float") == [[1.5, -2.25, float(np.float32(3e-8))]]


# ---- auth and gate --------------------------------------------------------------------------------------------
def test_api_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("REASONEMBED_API_KEY", raising=False)
    assert load_api_key(AuthConfig()) is None
    monkeypatch.setenv("REASONEMBED_API_KEY", "env-secret")
    assert load_api_key(AuthConfig()) == "env-secret"
    f = tmp_path / "key"
    f.write_text("file-secret\n")
    assert load_api_key(AuthConfig(api_key_file=str(f))) == "file-secret"
    f.write_text("  \n")
    with pytest.raises(AuthConfigError, match="empty"):
        load_api_key(AuthConfig(api_key_file=str(f)))
    with pytest.raises(AuthConfigError, match="does not exist"):
        load_api_key(AuthConfig(api_key_file=str(tmp_path / "nope")))


def test_bearer_check():
    assert bearer_ok("Bearer s3cret", "s3cret") and bearer_ok("bearer  s3cret ", "s3cret")
    for header in (None, "", "s3cret", "Basic s3cret", "Bearer s3cre", "Bearer s3cret2"):
        assert not bearer_ok(header, "s3cret")


def _call_gate(settings: GateSettings, path: str, headers: dict[str, str], body_parts: list[bytes]):
    """Drive the ASGI middleware directly; returns (status, headers, body, whether the app ran)."""
    ran, sent = [], []

    async def app(scope, receive, send):
        msg = await receive()
        ran.append(msg.get("body"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    parts = [{"type": "http.request", "body": p, "more_body": i < len(body_parts) - 1}
             for i, p in enumerate(body_parts)]

    async def receive():
        return parts.pop(0)

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": path, "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(RequestGate(app, lambda: settings)(scope, receive, send))
    start = sent[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:]), ran


def test_gate_checks_key_before_body_and_limits_streamed_bodies():
    s = GateSettings(api_key="k", max_body_bytes=10)
    status, headers, body, ran = _call_gate(s, "/v1/embeddings", {}, [b"{bad json"])
    assert status == 401 and not ran and headers[b"www-authenticate"] == b"Bearer" and b"k" not in body.replace(
        b"key", b"")
    assert _call_gate(s, "/health", {}, [b""])[0] == 200
    auth = {"authorization": "Bearer k"}
    assert _call_gate(s, "/v1/embeddings", {**auth, "content-length": "11"}, [b"x" * 11])[0] == 413
    status, _, body, ran = _call_gate(s, "/v1/embeddings", auth, [b"x" * 6, b"y" * 6])  # chunked, no length
    assert status == 413 and not ran and json.loads(body)["error"]["code"] == "request_too_large"
    status, _, _, ran = _call_gate(s, "/v1/embeddings", auth, [b"x" * 5, b"y" * 5])
    assert status == 200 and ran == [b"x" * 5 + b"y" * 5]


def test_overloaded_carries_retry_after():
    err = Overloaded("busy", retry_after_s=2.2, status=429)
    assert err.status == 429 and err.headers["Retry-After"] == "2"
    import pickle

    back = pickle.loads(pickle.dumps(err))
    assert back.status == 429 and back.headers == err.headers


# ---- search over an index folder (local and S3) -----------------------------------------------------------------
def test_retriever_resolves_encode_output_and_reads_texts(ray_local, tmp_path, s3_server):
    """The index and its texts come from the encode job (``index.store_texts``), served from a local folder and
    from S3."""
    from reasonembed.config.base import StorageConfig
    from reasonembed.config.encode import EncodeJobConfig
    from reasonembed.index.encode import load_embeddings, run
    from reasonembed.index.faiss_index import IndexMismatchError
    from reasonembed.serving.search import Retriever
    from reasonembed.storage import Location, open_run

    docs = {"a": "Tides are caused by the moon.", "b": "The moon pulls the oceans, which makes tides.",
            "c": "Mitochondria make ATP.", "d": "A cat sat on the mat."}
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in docs.items()))
    summary = run(EncodeJobConfig(run_id="t", out=str(tmp_path / "runs"), data={"path": str(tmp_path / "corpus.jsonl")},
                                  index={"store_texts": True}))
    stage = open_run(str(tmp_path / "runs"), "t").stage("encode")
    ids, x = load_embeddings(stage)
    local = Location(summary.index_uri)
    s3_index = Location("s3://reasonembed/serve-test/encode/index", StorageConfig())
    for name in local.list():
        s3_index.write_bytes(name, local.read_bytes(name))
    for uri in (stage.uri, "s3://reasonembed/serve-test/encode"):
        r = Retriever.load(uri)
        assert r.texts == docs  # every row's text, as encoded
        hits = r.search(x[[ids.index("a")]], 2, [["b"]], with_text=True)
        assert (hits[0][0].doc_id, hits[0][0].text) == ("a", docs["a"]) and "b" not in [h.doc_id for h in hits[0]]
        encoder = r.index.meta["encoder"]
        r.check_compatible(encoder)
        with pytest.raises(IndexMismatchError):
            r.check_compatible({**encoder, "model_name": "other"})
    with pytest.raises(FileNotFoundError, match="encode output"):
        Retriever.load(str(tmp_path))


def test_per_query_exclusions():
    from reasonembed.serving.errors import PayloadTooLarge
    from reasonembed.serving.search import per_query_exclusions

    assert per_query_exclusions(None, 2, 10) == [[], []]
    assert per_query_exclusions(["a"], 2, 10) == [["a"], ["a"]]
    assert per_query_exclusions([["a"], []], 2, 10) == [["a"], []]
    with pytest.raises(InvalidRequest, match="2 queries"):
        per_query_exclusions([["a"]], 2, 10)
    with pytest.raises(PayloadTooLarge):
        per_query_exclusions(["a", "b", "c"], 1, 2)


# ---- config and CLI -------------------------------------------------------------------------------------------
def test_serve_config_fields_and_flags():
    cfg = ServeJobConfig()
    assert cfg.host == "127.0.0.1"
    for flag, dotted in ServeJobConfig.FLAGS.items():
        node = cfg
        for part in dotted.split("."):
            assert part in type(node).model_fields, f"FLAGS[{flag}] -> {dotted} is not a field"
            node = getattr(node, part)

    def walk(model):
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no description"
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(ServeJobConfig)


def test_serve_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="batching.max_batch_size"):
        load_model(ServeJobConfig, None, ["batching.max_batch_size=0"])
    with pytest.raises(ConfigError, match="limits.max_inputz"):
        load_model(ServeJobConfig, None, ["limits.max_inputz=3"])
    with pytest.raises(ConfigError, match="token_budget"):
        load_model(ServeJobConfig, None, ["embedder.max_length=512", "batching.token_budget=256"])
    with pytest.raises(ConfigError, match="replica.*ingress_replicas only apply to topology 'split'"):
        load_model(ServeJobConfig, None, ["replica.topology=fused", "replica.ingress_replicas=2"])
    with pytest.raises(ConfigError, match="replica.topology"):
        load_model(ServeJobConfig, None, ["replica.topology=merged"])
    fused = load_model(ServeJobConfig, None, ["replica.topology=fused"])
    assert ServeJobConfig.model_validate(fused.model_dump(mode="json")) == fused  # what each replica re-validates


def test_direct_ingress_config_and_cluster_env():
    from reasonembed.serving.runner import direct_ingress_env

    cfg = load_model(ServeJobConfig, None, ["ingress=direct", "port=9100"])
    assert (cfg.port, cfg.serve_proxy_port) == (9100, 9101)  # the replica answers on port, Serve's proxy next to it
    assert load_model(ServeJobConfig, None, ["ingress=direct", "proxy_port=9300"]).serve_proxy_port == 9300
    assert load_model(ServeJobConfig, None, ["port=9100"]).serve_proxy_port == 9100
    with pytest.raises(ConfigError, match="autoscaling.max_replicas is 2"):
        load_model(ServeJobConfig, None, ["ingress=direct", "replica.topology=fused", "autoscaling.max_replicas=2"])
    with pytest.raises(ConfigError, match="replica.ingress_replicas is 3"):
        load_model(ServeJobConfig, None, ["ingress=direct", "replica.ingress_replicas=3"])
    # split + direct scales the model replicas freely: only the HTTP ingress must be single
    load_model(ServeJobConfig, None, ["ingress=direct", "autoscaling.max_replicas=4"])
    with pytest.raises(ConfigError, match="proxy_port must differ"):
        load_model(ServeJobConfig, None, ["ingress=direct", "port=9100", "proxy_port=9100"])
    with pytest.raises(ConfigError, match="set proxy_port"):
        load_model(ServeJobConfig, None, ["ingress=direct", "port=65535"])
    with pytest.raises(ConfigError, match="proxy_port only applies to ingress 'direct'"):
        load_model(ServeJobConfig, None, ["proxy_port=9300"])
    with pytest.raises(ConfigError, match="ingress"):
        load_model(ServeJobConfig, None, ["ingress=haproxy"])
    env = direct_ingress_env(9100)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == (
        "9100", "9101")  # Ray's range is half-open: exactly one port, the one clients use


def test_presets_validate():
    for preset in sorted((REPO / "configs" / "serve").glob("*.yaml")):
        header = preset.read_text().splitlines()[0]
        assert header.startswith("#") and "serve" in header, f"{preset} must start with its launch command"
        load_model(ServeJobConfig, preset)


def test_launch_config_errors_exit_2(tmp_path, capsys, monkeypatch):
    from reasonembed.serving.http import launch

    assert launch.main(["--model", "minilm", "batching.max_batch_size=0"]) == 2
    assert "batching.max_batch_size" in capsys.readouterr().err
    assert launch.main(["--api-key-file", str(tmp_path / "missing")]) == 2
    assert "api_key_file" in capsys.readouterr().err
    assert launch.main(["--index", str(tmp_path)]) == 2
    assert "index" in capsys.readouterr().err
    # direct ingress on a cluster this command did not start: refused before connecting, with the flags to set
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", raising=False)
    assert launch.main(["--model", "minilm", "ingress=direct"]) == 2
    assert "RAY_SERVE_ENABLE_DIRECT_INGRESS=1" in capsys.readouterr().err
    cfg = launch.load_config(launch.parse_args(["--model", "tiny-qwen3", "--port", "9001", "replica.num_cpus=2"]))
    assert (cfg.embedder.model, cfg.port, cfg.replica.num_cpus) == ("tiny-qwen3", 9001, 2.0)


def test_builder_args_and_serve_config_yaml():
    """serve/config.yaml is a valid Serve deploy config whose app args build a valid ServeJobConfig."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from reasonembed.serving.http import app

    raw = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (spec,) = schema.applications
    assert spec.import_path == "reasonembed.serving.http.app:build_app"
    assert schema.http_options.host == "127.0.0.1"
    cfg = config_from_args(spec.args)
    assert cfg.app_name == spec.name
    cfg = config_from_args({**spec.args, "embedder.model": "tiny-qwen3", "overrides": ["port=9002"]})
    assert cfg.embedder.model == "tiny-qwen3" and cfg.port == 9002
    with pytest.raises(ConfigError, match="batching.wait_timeout_s"):
        config_from_args({"batching": {"wait_timeout_s": -1}})
    built = app.build_app({"embedder": {"model": "minilm"}})
    assert built is not None


def test_embedder_shared_with_engine_matches_describe(minilm_engine):
    d = minilm_engine.describe()
    assert d["dim"] == 384 and d["token_budget"] == 1024
    assert {k: v for k, v in d.items() if k not in ("token_budget", "max_batch_size")} == \
        minilm_engine.embedder.describe()


def test_request_timer_counts_unexpected_failures_as_500():
    """An exception that is not a ServingError is answered 500 by Starlette: the request metrics must say 500."""
    from reasonembed.serving.errors import ServingError
    from reasonembed.serving.metrics import timed_request

    class Recorder:  # the ApiMetrics interface (observe), without Ray Serve's metric backends
        def __init__(self):
            self.statuses = []

        def observe(self, endpoint, status, ms, inputs=0, tokens=0, truncated=0):
            self.statuses.append((endpoint, status))

    rec = Recorder()
    with timed_request(rec, "/v1/embeddings"):
        pass
    with pytest.raises(ServingError), timed_request(rec, "/v1/embeddings"):
        raise InvalidRequest("bad", param="input")
    with pytest.raises(RuntimeError), timed_request(rec, "/v1/search"):
        raise RuntimeError("boom")
    assert rec.statuses == [("/v1/embeddings", 200), ("/v1/embeddings", 400), ("/v1/search", 500)]
