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
