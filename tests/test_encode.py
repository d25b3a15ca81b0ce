"""Batch encoding through Ray Data: parts, errors, manifest, FAISS index, resume, S3, kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from reasonembed.config.encode import EncodeJobConfig
from reasonembed.index import encode
from reasonembed.index.faiss_index import IndexMismatchError, IndexSpec, SearchIndex
from reasonembed.repeats import CONFLICTING_ID
from reasonembed.storage import open_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dirty_corpus(tmp_path_factory, mini_scifact) -> Path:
    """mini SciFact plus the bad rows a real corpus has: empty text, non-text, a malformed line, an id given twice
    with different texts (a conflict: both rows are errors)."""
    folder = tmp_path_factory.mktemp("dirty")
    lines = (mini_scifact / "corpus.jsonl").read_text().splitlines()[:120]
    first_id = json.loads(lines[0])["id"]
    lines += ['{"id": "empty1", "text": "   "}', '{"id": "num1", "text": 42}', "{not json",
              json.dumps({"id": first_id, "text": "a second document with the same id"})]
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _cfg(data: Path | str, out: Path | str, **engine) -> EncodeJobConfig:
    return EncodeJobConfig(out=str(out), run_id="t", data={"path": str(data)},
                           engine={"rows_per_shard": 40, **engine})


@pytest.fixture(scope="module")
def encoded(ray_local, dirty_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc")
    summary = encode.run(_cfg(dirty_corpus, out))
    return out, summary


def test_encode_writes_parts_errors_manifest_index(encoded, dirty_corpus, minilm_path):
    out, summary = encoded
    stage = open_run(str(out), "t").stage("encode")
    ids, x = encode.load_embeddings(stage)
    assert len(ids) == len(set(ids)) == 119 and summary.rows == 119
    errors = stage.read_errors().to_pylist()
    reasons = sorted(e["reason"].split(" (")[0] for e in errors)
    assert reasons == sorted([CONFLICTING_ID, CONFLICTING_ID, "empty text", "malformed JSON line", "non-text 'text'"])
    m = stage.read_manifest()
    assert m.rows_in == 124 and m.rows_out == 119 and m.rows_error == 5
    assert m.extra["tokens"] > 0 and m.extra["truncated"] > 0
    assert pq.read_schema(stage._p(stage.parts()[0])).field("embedding").type.list_size == 384
    # same vectors as sentence-transformers
    from sentence_transformers import SentenceTransformer

    texts = {json.loads(line)["id"]: json.loads(line)["text"]
             for line in (dirty_corpus / "corpus.jsonl").read_text().splitlines()[:120]}
    sample = ids[:16]
    ref = SentenceTransformer(str(minilm_path), device="cpu").encode([texts[i] for i in sample],
                                                                     normalize_embeddings=True)
    assert np.max(np.abs((x[:16] * ref).sum(1) - 1)) < 1e-5
    # the index finds each document from its own text
    index = SearchIndex.load(summary.index_uri)
    assert index.ntotal == 119 and index.meta["encoder"]["model_name"] == "all-MiniLM-L6-v2"
    hits = index.search(ref[:4], 3)
    assert [h[0][0] for h in hits] == sample[:4]


def test_rerun_skips_and_resume_redoes_only_missing_shards(encoded, dirty_corpus):
    out, first = encoded
    again = encode.run(_cfg(dirty_corpus, out))
    assert again.wall_s == 0.0 and again.rows == first.rows  # stage complete: skipped
    stage = open_run(str(out), "t").stage("encode")
    before = {p: os.path.getmtime(stage._p(p)) for p in stage.parts()}
    victim = sorted(before)[1]
    ids_before, x_before = encode.load_embeddings(stage)
    os.remove(stage._p(victim))
    os.remove(stage._p("_manifest.json"))  # as if killed before the end
    resumed = encode.run(_cfg(dirty_corpus, out))
    assert resumed.shards_done_before == len(before) - 1
    after = {p: os.path.getmtime(stage._p(p)) for p in stage.parts()}
    assert set(after) == set(before)
    assert all(after[p] == before[p] for p in before if p != victim)
    ids_after, x_after = encode.load_embeddings(stage)
    assert sorted(ids_after) == sorted(ids_before) and len(ids_after) == len(set(ids_after))
    order = {d: i for i, d in enumerate(ids_before)}
    assert np.allclose(x_after, x_before[[order[d] for d in ids_after]], atol=1e-6)


def test_config_change_is_refused_not_mixed(encoded, dirty_corpus):
    out, _ = encoded
    from reasonembed.storage import StageConflictError

    stage = open_run(str(out), "t").stage("encode")
    os.remove(stage._p("_manifest.json"))
    with pytest.raises(StageConflictError):
        encode.run(_cfg(dirty_corpus, out, rows_per_shard=33))


def test_stale_error_file_of_an_unfinished_shard_is_replaced(encoded, dirty_corpus):
    """A shard redone without errors drops the error rows an interrupted attempt left: its error table is always
    written (an empty one removes the file) before its part."""
    import pyarrow as pa

    out, _ = encoded
    stage = open_run(str(out), "t").stage("encode")
    with_errors = set(stage.list("errors", ".parquet"))
    victim = next(p for p in stage.parts() if p not in with_errors)
    shard = victim[len("part-"):-len(".parquet")]
    os.remove(stage._p(victim))
    if stage.exists("_manifest.json"):
        os.remove(stage._p("_manifest.json"))
    stage.write_errors(pa.table({"doc_id": ["ghost"], "reason": ["stale"], "text": [""]}), shard)
    encode.run(_cfg(dirty_corpus, out))
    m = stage.read_manifest()
    assert m.rows_out + m.rows_error == m.rows_in == 124
    assert not stage.exists(f"errors/{victim}") and "ghost" not in stage.read_errors().column("doc_id").to_pylist()


def test_index_refuses_another_query_format_or_eos():
    enc = {"model_name": "m", "pooling": "last_token", "append_eos": True, "query_format": "Q: {query}", "dim": 8}
    index = SearchIndex.build(np.eye(4, 8, dtype=np.float32), ["a", "b", "c", "d"], meta={"encoder": enc})
    index.check_compatible(enc)
    with pytest.raises(IndexMismatchError, match="append_eos"):
        index.check_compatible({**enc, "append_eos": False})
    with pytest.raises(IndexMismatchError, match="query_format"):
        index.check_compatible({**enc, "query_format": "Instruct: {task}\nQuery: {query}"})


def test_index_refuses_another_model():
    x = np.eye(4, 8, dtype=np.float32)
    index = SearchIndex.build(x, ["a", "b", "c", "d"], IndexSpec(),
                              meta={"encoder": {"model_name": "all-MiniLM-L6-v2", "pooling": "mean", "dim": 8}})
    with pytest.raises(IndexMismatchError, match="model_name"):
        index.check_compatible({"model_name": "tiny-qwen3", "pooling": "mean", "dim": 8})
    with pytest.raises(IndexMismatchError, match="dimension"):
        index.search(np.ones((1, 5), np.float32), 2)
    hits = index.search(x[:1], 4, excluded=[["a"]])
    assert [d for d, _ in hits[0]][0] != "a" and len(hits[0]) == 3


def test_sharded_and_approximate_indexes_agree_with_flat(encoded):
    out, _ = encoded
    ids, x = encode.load_embeddings(open_run(str(out), "t").stage("encode"))
    flat = SearchIndex.build(x, ids)
    sharded = SearchIndex.build(x, ids, IndexSpec(shard_size=50))
    hnsw = SearchIndex.build(x, ids, IndexSpec(kind="hnsw"))
    q = x[:10]
    assert len(sharded.shards) == 3
    assert [h[:5] for h in sharded.search(q, 5)] == [h[:5] for h in flat.search(q, 5)]
    assert [h[0][0] for h in hnsw.search(q, 1)] == ids[:10]


def test_encode_reads_and_writes_s3(ray_local, s3_server, dirty_corpus):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.put_object(Bucket="reasonembed", Key="corpora/dirty/corpus.jsonl",
                  Body=(dirty_corpus / "corpus.jsonl").read_bytes())
    summary = encode.run(_cfg("s3://reasonembed/corpora/dirty", "s3://reasonembed/runs"))
    assert summary.rows == 119 and summary.index_uri.startswith("s3://")
    index = SearchIndex.load(summary.index_uri)
    assert index.ntotal == 119
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="reasonembed", Prefix="runs/t/encode/")["Contents"]]
    assert "runs/t/encode/_manifest.json" in keys and any(k.startswith("runs/t/encode/errors/") for k in keys)


@pytest.mark.slow
def test_killed_encode_job_resumes_without_loss_or_duplicates(tmp_path, dirty_corpus, encoded):
    """SIGKILL the CLI job once the first part is committed, re-run it, compare with the uninterrupted run."""
    ref_out, _ = encoded
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "reasonembed.cli", "encode", "--data", str(dirty_corpus), "--out", str(out),
           "run_id=t", "engine.rows_per_shard=10", "engine.shards_per_round=1",
           # Small shards and windows: all rounds stream through one actor pool, and one default window (1,024
           # rows) would hold the whole corpus and commit every shard at once, leaving nothing to resume.
           "engine.window_rows=2",
           # One pool for all ~13 rounds (one model load, the `0` setting): a pool every 2 rounds doubled the time.
           "engine.rounds_per_pool=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    stage_dir = out / "t" / "encode"
    deadline = time.time() + 600
    while time.time() < deadline and not list(stage_dir.glob("part-*.parquet")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    parts_at_kill = len(list(stage_dir.glob("part-*.parquet")))
    assert parts_at_kill >= 1 and not (stage_dir / "_manifest.json").exists()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed past {parts_at_kill} shards" in done.stdout
    assert parts_at_kill < len(list(stage_dir.glob("part-*.parquet"))), "the killed run left shards to do"
    ids, x = encode.load_embeddings(open_run(str(out), "t").stage("encode"))
    ref_ids, ref_x = encode.load_embeddings(open_run(str(ref_out), "t").stage("encode"))
    assert len(ids) == len(set(ids)) == len(ref_ids)
    order = {d: i for i, d in enumerate(ref_ids)}
    assert np.allclose(x, ref_x[[order[d] for d in ids]], atol=1e-6)
