"""Storage over local folders and a real S3 server (moto on 127.0.0.1)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from reasonembed.config.base import StorageConfig
from reasonembed.storage import Manifest, StageConflictError, StorageError, open_run


def _roundtrip(root: str):
    run = open_run(root, "r1")
    stage = run.stage("encode")
    stage.begin("h1")
    assert stage.done_shards() == set() and not stage.is_done("h1")
    stage.write_part(pa.table({"x": [1, 2]}), 0)
    stage.write_part(pa.table({"x": [3]}), 7)
    stage.write_errors(pa.table({"doc_id": ["d9"], "reason": ["empty text"]}), 7)
    stage.write_errors(pa.table({"doc_id": pa.array([], pa.string())}), 0)  # empty: nothing written
    assert stage.done_shards() == {"00000", "00007"} and stage.has_shard(7) and not stage.has_shard(1)
    assert stage.read_parts().column("x").to_pylist() == [1, 2, 3]
    assert stage.read_errors().column("doc_id").to_pylist() == ["d9"]
    m = stage.write_manifest(config_hash="h1", rows_in=4, rows_out=3, rows_error=1, errors_by_reason={"empty": 1})
    assert stage.is_done("h1") and not stage.is_done("h2")
    back = stage.read_manifest()
    assert back.rows_out == 3 and back.shards == 2 and back.code_version and "pyarrow" in back.packages
    assert isinstance(m, Manifest)
    with pytest.raises(StageConflictError, match="was started with config h1"):
        run.stage("encode").begin("h2")
    run.stage("encode").begin("h2", overwrite=True)
    assert run.stage("encode").done_shards() == set()
    return stage


def test_local_stage_roundtrip_and_no_temp_files_left(tmp_path):
    _roundtrip(str(tmp_path))
    leftovers = [p for p in tmp_path.rglob(".*") if p.is_file()]
    assert leftovers == []


def test_s3_stage_roundtrip(s3_server):
    stage = _roundtrip("s3://reasonembed/runs")
    assert stage.uri.startswith("s3://reasonembed/runs/r1/encode")


def test_s3_errors_are_clear(s3_server):
    with pytest.raises(StorageError, match="bucket 'missing-bucket' does not exist"):
        open_run("s3://missing-bucket/x", "r")
    dead = StorageConfig(s3_endpoint="http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(StorageError, match="cannot reach S3"):
        open_run("s3://reasonembed/x", "r", dead)


def test_changed_inputs_refuse_resume_and_reuse(tmp_path):
    """Issue 13 item 2: a stage keyed on config alone silently reused stale rows; now its inputs are fingerprinted."""
    from reasonembed.input_fingerprint import files_fingerprint
    from reasonembed.storage import InputsChangedError, open_run

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "a", "text": "one"}\n')
    stage = open_run(tmp_path / "runs", "r").stage("s")
    inputs = files_fingerprint([str(corpus)])
    stage.begin("h1", inputs=inputs)
    stage.write_part(pa.table({"x": [1]}), 0)
    # A partial stage resumes under the same inputs ...
    stage.begin("h1", inputs=inputs)
    assert stage.has_shard(0)
    corpus.write_text('{"_id": "a", "text": "two, edited"}\n')
    changed = files_fingerprint([str(corpus)])
    # ... and refuses other inputs, naming the file.
    with pytest.raises(InputsChangedError, match="changed: .*corpus.jsonl"):
        stage.begin("h1", inputs=changed)
    stage.begin("h1", inputs=inputs)
    stage.write_manifest(config_hash="h1", rows_out=1)
    assert stage.is_done("h1", inputs)
    with pytest.raises(InputsChangedError, match="corpus.jsonl"):
        stage.is_done("h1", changed)
    # overwrite: not done, and begin discards the stale parts.
    assert not stage.is_done("h1", changed, overwrite=True)
    stage.begin("h1", overwrite=True, inputs=changed)
    assert not stage.has_shard(0)


def test_empty_error_table_removes_stale_error_file(tmp_path):
    """Issue 13 item 3: a shard redone without errors must not keep an interrupted attempt's error rows."""
    from reasonembed.storage import open_run

    stage = open_run(tmp_path / "runs", "r").stage("s")
    stage.begin("h")
    stage.write_errors(pa.table({"id": ["a"], "reason": ["engine_error"]}), 3)
    assert stage.read_errors().num_rows == 1
    stage.write_errors(pa.table({"id": pa.array([], pa.string()), "reason": pa.array([], pa.string())}), 3)
    assert stage.read_errors().num_rows == 0


def test_repeat_rule_tells_retries_from_conflicts():
    """Issue 13 item 5: one rule for both paths: identical repeats are retries, same id + other input is a conflict."""
    from reasonembed.repeats import content_key, split_repeats

    ids = ["a", "b", "a", "c", "c", "a"]
    keys = [content_key(t) for t in ["x", "y", "x", "p", "q", "x"]]
    keep, repeats, conflicts = split_repeats(ids, keys)
    assert keep == [0, 1]
    assert repeats == [2, 5]
    assert conflicts == [3, 4]
