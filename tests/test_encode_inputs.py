"""Encode job on a small corpus: width without an index, repeated ids, changed inputs, stored texts (issue 13)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from reasonembed.config import load_job_config
from reasonembed.index import encode
from reasonembed.repeats import CONFLICTING_ID
from reasonembed.storage import InputsChangedError, open_run

REPO = Path(__file__).resolve().parents[1]
CONFIG = """\
run_id: t
embedder: {model: minilm}
engine: {rows_per_shard: 5, num_cpus_per_actor: 1}
index: {build: false}
ray: {object_store_memory_mb: 256}
"""


@pytest.fixture(scope="module")
def docs(mini_scifact) -> list[dict]:
    return [json.loads(line) for line in (mini_scifact / "corpus.jsonl").read_text().splitlines()[:12]]


def _write_corpus(path: Path, docs: list[dict]) -> None:
    """The docs, plus a verbatim copy of doc 1 (a repeat: kept once) and doc 2's id with another text (a conflict)."""
    rows = [*docs, docs[1], {**docs[2], "text": "another document under the same id"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def job(ray_local, docs, tmp_path_factory):
    """(config file, corpus file, out folder) of an encode run with ``index.build: false`` (no driver-side probe)."""
    root = tmp_path_factory.mktemp("enc-inputs")
    corpus, cfg_file = root / "corpus.jsonl", root / "encode.yaml"
    _write_corpus(corpus, docs)
    cfg_file.write_text(CONFIG)
    out = root / "out"
    encode.run(_load(cfg_file, corpus, out))
    return cfg_file, corpus, out


def _load(cfg_file: Path, corpus: Path, out: Path, *overrides: str):
    return load_job_config("encode", cfg_file, [f"data.path={corpus}", f"out={out}", "data.title_field=null",
                                                *overrides])


def test_encode_without_index_writes_parts_of_the_model_width_and_settles_repeats(job, docs):
    _, corpus, out = job
    stage = open_run(str(out), "t").stage("encode")
    assert all(pq.read_schema(stage._p(p)).field("embedding").type.list_size == 384 for p in stage.parts())
    ids, x = encode.load_embeddings(stage)
    # the verbatim repeat of doc 1 is one row, silently; doc 2, given two texts, is no row at all
    assert sorted(ids) == sorted(d["id"] for i, d in enumerate(docs) if i != 2) and x.shape == (11, 384)
    errors = stage.read_errors().to_pylist()
    assert [(e["doc_id"], e["reason"]) for e in errors] == [(docs[2]["id"], CONFLICTING_ID)] * 2
    assert {e["text"] for e in errors} == {docs[2]["text"][:500], "another document under the same id"}
    m = stage.read_manifest()
    assert (m.rows_in, m.rows_out, m.rows_error) == (14, 11, 2)
    assert str(corpus.resolve()) in m.inputs and "model:minilm" in m.inputs
    # store_texts false: no texts anywhere, and no index
    assert not stage.exists("texts") and not stage.exists("index")


def test_changed_corpus_is_refused_then_redone_with_overwrite(job, docs):
    from reasonembed.models.embedder import Embedder

    cfg_file, corpus, out = job
    changed = [*docs]
    changed[3] = {**docs[3], "text": "Tides are caused by the gravitational pull of the moon."}
    _write_corpus(corpus, changed)
    with pytest.raises(InputsChangedError, match=f"changed: {corpus.resolve()}"):
        encode.run(_load(cfg_file, corpus, out))
    # the CLI reports it as one line, exit code 2, no traceback
    cli = subprocess.run([sys.executable, "-m", "reasonembed.cli", "encode", "--config", str(cfg_file),
                          "--data", str(corpus), "--out", str(out), "data.title_field=null"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in cli.stderr.splitlines() if ln.startswith("reasonembed encode: error:")]
    assert cli.returncode == 2 and "Traceback" not in cli.stderr, cli.stderr[-2000:]
    assert len(lines) == 1 and str(corpus.resolve()) in lines[0] and "--overwrite" in lines[0]
    from reasonembed.cli import parse_job_args

    assert "overwrite=true" in parse_job_args("encode", ["--overwrite"])[1]  # the switch the message names
    summary = encode.run(_load(cfg_file, corpus, out, "overwrite=true"))
    assert summary.rows == 11 and summary.wall_s > 0
    ids, x = encode.load_embeddings(open_run(str(out), "t").stage("encode"))
    want = Embedder(load_job_config("encode", cfg_file).embedder).encode([changed[3]["text"]])[0]
    assert float(x[ids.index(docs[3]["id"])] @ want) > 0.9999


def test_in_memory_corpus_with_an_all_error_shard_first(ray_local, tmp_path):
    """A caller's in-memory corpus (as evaluation and mining pass it), with ``index.build: false``: a shard with no
    embedded row gets an empty part of the model's width, so every part has one schema and the stage loads."""
    import pyarrow as pa

    from reasonembed.config.encode import EncodeJobConfig

    table = pa.table({"doc_id": ["e1", "e2", "g1", "g2"], "text": ["", "", "a cat", "a dog"],
                      "error": ["empty text", "empty text", "", ""], "shard": pa.array([0, 0, 1, 1], pa.int64())})

    def build(n_shards: int):
        assert n_shards == 2
        return ray_local.data.from_arrow(table)

    cfg = EncodeJobConfig(out=str(tmp_path), run_id="t", data={"path": "<in-memory>"}, index={"build": False},
                          engine={"rows_per_shard": 2, "shards_per_round": 1})
    summary = encode.run(cfg, dataset_builder=build, n_rows=4, inputs={"upstream": "stage:abc"})
    stage = open_run(str(tmp_path), "t").stage("encode")
    assert [pq.read_schema(stage._p(p)).field("embedding").type.list_size for p in stage.parts()] == [384, 384]
    ids, x = encode.load_embeddings(stage)
    assert summary.rows == 2 and summary.rows_error == 2 and sorted(ids) == ["g1", "g2"] and x.shape == (2, 384)
    assert stage.read_manifest().inputs["upstream"] == "stage:abc"


def test_parquet_corpus_is_read_on_the_flat_memory_path_in_fixed_batches(ray_local, tmp_path):
    """Corpus parquet is read on Ray's V1 datasource (the V2 default kept memory in proportion to what a worker
    had read, docs/scale.md), without changing the caller's Ray Data context, and parsed in fixed-size batches."""
    import pyarrow as pa
    import ray

    from reasonembed.config.encode import CorpusSource
    from reasonembed.index.reader import NORMALISE_BATCH_ROWS, read_corpus

    n = NORMALISE_BATCH_ROWS * 2 + 5
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(n)], "text": [f"text {i}" for i in range(n)]}),
                   tmp_path / "part-0.parquet")
    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    build, rows = read_corpus(CorpusSource(path=str(tmp_path), title_field=None))
    assert ctx.use_datasource_v2 == before
    ds = build(3)
    op = ds._logical_plan.dag
    assert op.name == "MapBatches(norm)" and op.batch_size == NORMALISE_BATCH_ROWS
    while op.input_dependencies:
        op = op.input_dependencies[0]
    assert op.name == "ReadParquet"  # the V1 read; V2 plans ListFiles -> ReadFiles
    assert rows == n
    ids = sorted(i for b in ds.iter_batches(batch_format="numpy") for i in b["doc_id"])
    assert ids == sorted(f"d{i}" for i in range(n))
