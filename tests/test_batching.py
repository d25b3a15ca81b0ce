"""Training data reading (redapter.data) and domain batching (redapter.batching) on small hand-made files."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reasonembed.config.base import ConfigError, StorageConfig, load_model
from reasonembed.data.types import DataError
from reasonembed.redapter.batching import BatchPlanner, sample_group
from reasonembed.redapter.data import ERROR_SCHEMA, TrainDataConfig, read_training_data
from reasonembed.schemas import SAMPLE_SCHEMA, TRAINING_SCHEMA, MissingColumnsError

LEET_PROMPT = "Given a Coding problem, retrieve relevant examples that help answer the problem."
BIO_PROMPT = "Given a Biology post, retrieve relevant passages that help answer the post."


def release_row(domain: str, i: int, n_pos: int = 2, n_neg: int = 5, group: int = 4, batch: int = 2,
                reasoning: bool = True) -> dict:
    """One record in the public release's shape: exactly these seven fields, sizes as JSON integers."""
    return {
        "prompt": LEET_PROMPT if domain == "leetcode" else BIO_PROMPT,
        "query": f"{domain} query {i}: why does the thing happen?",
        "reasoning_query": f"{domain} query {i} needs knowledge of X and Y" if reasoning else "",
        "pos": [f"{domain}-{i}-pos-{k}" for k in range(n_pos)],
        "neg": [f"{domain}-{i}-neg-{k}" for k in range(n_neg)],
        "train_group_size": group,
        "batch_size": batch,
    }


def write_jsonl(path: Path, rows: list, raw_lines: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def synthesis_table(domain: str, n: int, group: int = 3, batch: int = 2, start: int = 0) -> pa.Table:
    """Rows in the platform's format-stage schema (ids and scores included)."""
    rows = []
    for i in range(start, start + n):
        pos = [f"{domain}-d{i}a", f"{domain}-d{i}b"]
        neg = [f"{domain}-n{i}-{k}" for k in range(4)]
        rows.append({
            "sample_id": f"{domain}-s{i}", "domain": domain, "prompt": f"Given a {domain} post, retrieve passages.",
            "query": f"{domain} question {i}", "reasoning_query": f"{domain} question {i}, reasoned",
            "pos": pos, "neg": neg, "pos_ids": [f"id-{p}" for p in pos], "neg_ids": [f"id-{x}" for x in neg],
            "pos_scores": [5, 4], "neg_scores": [1, 2, 1, 1], "source_doc_id": f"src-{i}",
            "train_group_size": group, "batch_size": batch,
        })
    return pa.Table.from_pylist(rows)


@pytest.fixture
def release_dir(tmp_path) -> Path:
    d = tmp_path / "reason-embed-data-0928"
    d.mkdir()
    # biology: 11 rows, 2 without reasoning_query, one with only 2 negatives (group 4 needs 3)
    bio = [release_row("biology", i, reasoning=i not in (3, 7), n_neg=2 if i == 5 else 5) for i in range(11)]
    write_jsonl(d / "biology.jsonl", bio)
    # leetcode: group 2, batch 3 (per device); 9 rows
    write_jsonl(d / "leetcode.jsonl", [release_row("leetcode", i, group=2, batch=3) for i in range(9)])
    # pony: exactly what the authors' formatting script (ReasonEmbed/data_synthesis/4-process.py) writes: key order
    # prompt, query, pos, neg, train_group_size, batch_size; no reasoning_query; ensure_ascii=False; a logs/ folder
    pony = [{"prompt": "Given a Pony question, retrieve relevant passages that help answer the question.",
             "query": f"Wie schreibe ich einen Aktor in Pony, der Nachrichten zählt? ({i}) — “quoted”",
             "pos": [f"actor Counter … {i}"], "neg": [f"use \"collections\" {i}-{k}" for k in range(5)],
             "train_group_size": 64, "batch_size": 2} for i in range(3)]
    (d / "pony.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pony), encoding="utf-8")
    (d / "logs").mkdir()
    (d / "logs" / "pony_log.json").write_text(json.dumps({"task_type": "pony"}, indent=4))
    (d / "_manifest.json").write_text("{}")
    (d / "README.md").write_text("not data")
    return d


# -- reading ---------------------------------------------------------------------------------------------------------

def test_reads_release_jsonl_format(release_dir, caplog):
    caplog.set_level(logging.WARNING)
    data = read_training_data(TrainDataConfig(paths=[str(release_dir)]))
    t = data.table
    assert t.schema == TRAINING_SCHEMA
    assert data.n_samples == 23 and data.errors.num_rows == 0
    assert [Path(f).name for f in data.files] == ["biology.jsonl", "leetcode.jsonl", "pony.jsonl"]
    assert Counter(t["domain"].to_pylist()) == {"biology": 11, "leetcode": 9, "pony": 3}  # domain = file stem
    ids = t["sample_id"].to_pylist()
    assert len(set(ids)) == 23 and all(len(i) == 16 for i in ids)  # content hashes: stable, unique here
    assert read_training_data(TrainDataConfig(paths=[str(release_dir)])).table["sample_id"].to_pylist() == ids
    assert data.summary()["without_reasoning_query"] == 5  # 2 blank in biology, pony has no such field
    assert "5 of 23 samples have no reasoning_query" in caplog.text
    row = t.slice(0, 1).to_pylist()[0]
    assert row["prompt"] == BIO_PROMPT and row["pos"] == ["biology-0-pos-0", "biology-0-pos-1"]
    assert row["train_group_size"] == 4 and row["batch_size"] == 2 and row["row"] == 0
    pony = t.slice(20, 1).to_pylist()[0]
    assert pony["query"].startswith("Wie schreibe") and pony["query"].endswith("“quoted”")
    assert pony["reasoning_query"] is None and pony["neg"][0] == 'use "collections" 0-0'
    assert (pony["train_group_size"], pony["batch_size"]) == (64, 2)


def test_reads_synthesis_parquet_stage_folder(tmp_path):
    stage = tmp_path / "run" / "synthesize" / "format"
    (stage / "errors").mkdir(parents=True)
    pq.write_table(synthesis_table("biology", 5), stage / "part-00000.parquet")
    pq.write_table(synthesis_table("pony", 4, group=5, batch=1), stage / "part-00001.parquet")
    pq.write_table(pa.table({"reason": ["unparseable score"]}), stage / "errors" / "part-00000.parquet")
    (stage / "_manifest.json").write_text("{}")
    data = read_training_data(TrainDataConfig(paths=[str(stage)]))
    assert data.n_samples == 9 and data.errors.num_rows == 0  # errors/ is not read as samples
    assert data.table["sample_id"].to_pylist()[:2] == ["biology-s0", "biology-s1"]
    planner = BatchPlanner(data, TrainDataConfig(paths=[str(stage)]), world_size=1)
    assert {n: (p.group_size, p.batch_size) for n, p in planner.domains.items()} == {
        "biology": (3, 2), "pony": (5, 1)}


def test_synthesis_and_release_layouts_read_into_the_canonical_dtypes(tmp_path):
    """Synthesis writes int32 group/batch sizes (the canonical sample schema), JSON integers arrive as int64: both
    are cast to the sample schema's dtype, so one table holds both layouts."""
    as_int32 = pa.Table.from_pylist(synthesis_table("biology", 3).to_pylist(), schema=pa.schema(
        [SAMPLE_SCHEMA.field(n) for n in synthesis_table("biology", 1).column_names]))
    assert as_int32.schema.field("train_group_size").type == pa.int32()
    pq.write_table(as_int32, tmp_path / "part-00000.parquet")
    as_int64 = synthesis_table("pony", 2, group=5, batch=1)
    assert as_int64.schema.field("train_group_size").type == pa.int64()
    pq.write_table(as_int64, tmp_path / "part-00001.parquet")
    write_jsonl(tmp_path / "leetcode.jsonl", [release_row("leetcode", i, group=2, batch=3) for i in range(2)])
    data = read_training_data(TrainDataConfig(paths=[str(tmp_path)]))
    assert data.table.schema == TRAINING_SCHEMA and data.n_samples == 7
    for name in ("train_group_size", "batch_size"):
        assert TRAINING_SCHEMA.field(name).type == SAMPLE_SCHEMA.field(name).type == pa.int32()
    sizes = {d: (g, b) for d, g, b in zip(*(data.table[c].to_pylist() for c in ("domain", "train_group_size",
                                                                               "batch_size")), strict=True)}
    assert sizes == {"biology": (3, 2), "pony": (5, 1), "leetcode": (2, 3)}


def test_parquet_without_required_columns_is_refused_by_name(tmp_path):
    """A parquet input lacking a column training requires (here another stage's output) names the stage, the file
    and the missing columns instead of turning every row into an error row."""
    f = tmp_path / "part-00000.parquet"
    pq.write_table(synthesis_table("biology", 2).drop_columns(["neg", "pos"]), f)
    with pytest.raises(MissingColumnsError, match=r"train: input .*part-00000.parquet lacks required columns "
                                                  r"'pos' \(.*\); 'neg' \(.*\)"):
        read_training_data(TrainDataConfig(paths=[str(f)]))


def test_bad_rows_go_to_error_table_or_raise(tmp_path):
    good = [release_row("biology", i) for i in range(4)]
    bad_pos = release_row("biology", 10, n_pos=0)
    bad_neg = release_row("biology", 11, n_neg=0)
    no_query = dict(release_row("biology", 12), query="  ")
    f = write_jsonl(tmp_path / "biology.jsonl", [*good[:2], bad_pos, bad_neg, *good[2:], no_query],
                    raw_lines=('{"query": "broken", "pos": [',))
    cfg = TrainDataConfig(paths=[str(f)])
    data = read_training_data(cfg)
    assert data.n_samples == 4
    errs = data.errors.to_pylist()
    assert data.errors.schema == ERROR_SCHEMA
    by_row = {e["row"]: e["reason"].split(":", 1)[0] for e in errs}
    assert by_row == {2: "no_positive", 3: "no_negative", 6: "no_query", 7: "bad_json"}
    assert all(e["source"] == str(f) for e in errs)
    assert "line 8" in next(e["reason"] for e in errs if e["row"] == 7)
    assert next(e["raw_text"] for e in errs if e["row"] == 7) == '{"query": "broken", "pos": ['
    assert data.summary()["errors_by_reason"] == {"no_positive": 1, "no_negative": 1, "no_query": 1, "bad_json": 1}
    # surviving rows keep their own record index, so errors and samples point at the right lines
    assert data.table["row"].to_pylist() == [0, 1, 4, 5]

    with pytest.raises(DataError, match=r"biology.jsonl row 2 \(sample_id \w+\): no_positive"):
        read_training_data(cfg.model_copy(update={"on_bad_row": "raise"}))


def test_missing_inputs_and_config_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_training_data(TrainDataConfig(paths=[str(tmp_path / "nope")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .parquet or .jsonl files"):
        read_training_data(TrainDataConfig(paths=[str(tmp_path / "empty")]))
    only_bad = write_jsonl(tmp_path / "x.jsonl", [release_row("x", 0, n_pos=0)])
    with pytest.raises(DataError, match="no valid training samples"):
        read_training_data(TrainDataConfig(paths=[str(only_bad)]))
    with pytest.raises(ConfigError, match="batch_szie: unknown key"):
        load_model(TrainDataConfig, overrides=["paths=[a]", "batch_szie=4"])
    with pytest.raises(ConfigError, match="paths"):
        load_model(TrainDataConfig, overrides=[])
    assert all(f.description for f in TrainDataConfig.model_fields.values())


def test_reads_from_s3(s3_server, tmp_path, release_dir):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for f in sorted(release_dir.glob("*.jsonl")):
        s3.upload_file(str(f), "reasonembed", f"train-data/release/{f.name}")
    buf = pa.BufferOutputStream()
    pq.write_table(synthesis_table("pony", 3), buf)
    s3.put_object(Bucket="reasonembed", Key="train-data/synth/part-00000.parquet", Body=buf.getvalue().to_pybytes())
    cfg = TrainDataConfig(paths=["s3://reasonembed/train-data/release", "s3://reasonembed/train-data/synth"])
    data = read_training_data(cfg, StorageConfig(s3_endpoint=s3_server))
    assert data.n_samples == 26
    assert Counter(data.table["domain"].to_pylist()) == {"biology": 11, "leetcode": 9, "pony": 6}
    assert data.files[0] == "s3://reasonembed/train-data/release/biology.jsonl"


# -- groups ----------------------------------------------------------------------------------------------------------

def test_sample_group_repeats_short_negatives():
    rng = np.random.default_rng(0)
    pos, negs, repeated = sample_group(3, 2, 8, rng)
    assert 0 <= pos < 3 and len(negs) == 7 and repeated
    assert max(Counter(negs).values()) <= math.ceil(7 / 2) and set(negs) == {0, 1}
    pos, negs, repeated = sample_group(1, 10, 4, np.random.default_rng(1))
    assert pos == 0 and len(set(negs)) == 3 and not repeated  # without replacement when there are enough
    assert sample_group(2, 0, 1, np.random.default_rng(2))[1:] == ([], False)  # group 1: positive only
    with pytest.raises(ValueError, match="0 negatives"):
        sample_group(1, 0, 4, np.random.default_rng(3))


# -- batches ---------------------------------------------------------------------------------------------------------

def test_global_batches_one_domain_sharded_identically(release_dir, caplog):
    caplog.set_level(logging.INFO)
    cfg = TrainDataConfig(paths=[str(release_dir)])
    data = read_training_data(cfg)
    world = 2
    planners = [BatchPlanner(data, cfg, world_size=world, rank=r, seed=7) for r in range(world)]
    sched, stats = planners[0].schedule(0)
    # every rank computes the same global schedule on its own
    assert all([(b.domain, b.rows.tolist()) for b in p.schedule(0)[0]] ==
               [(b.domain, b.rows.tolist()) for b in sched] for p in planners)
    # biology: batch 2/device -> 4 per step, 11 rows -> 2 steps, 3 left out; leetcode: 3/device -> 6, 9 -> 1 step
    # pony: batch 2/device -> 4 per step > 3 rows -> not trained on (warned), all 3 counted as left out
    assert stats.steps_per_domain == {"biology": 2, "leetcode": 1, "pony": 0}
    assert stats.dropped == {"biology": 3, "leetcode": 3, "pony": 3}
    assert stats.steps == len(sched) == planners[1].steps_per_epoch() == 3
    assert "9 samples left out" in caplog.text and "domain pony: 3 samples < one global batch" in caplog.text
    domains = data.table["domain"].to_pylist()
    seen: list[int] = []
    for gb in sched:
        assert {domains[i] for i in gb.rows} == {gb.domain}  # same_dataset_within_batch
        plan = planners[0].domains[gb.domain]
        assert len(gb.rows) == plan.batch_size * world and gb.group_size == plan.group_size
        shards = [p.local_rows(gb) for p in planners]
        assert np.concatenate(shards).tolist() == gb.rows.tolist()  # rank r takes slice r, no overlap
        seen.extend(gb.rows.tolist())
    assert len(seen) == len(set(seen)) == 14
    # another epoch reshuffles
    assert [b.rows.tolist() for b in planners[0].schedule(1)[0]] != [b.rows.tolist() for b in sched]


def test_local_batch_layout_and_repetition_counts(release_dir, caplog):
    caplog.set_level(logging.INFO)
    cfg = TrainDataConfig(paths=[str(release_dir)], domains=["biology"], batch_size=11)
    data = read_training_data(cfg)
    planner = BatchPlanner(data, cfg, world_size=1, seed=3)
    [batch] = list(planner.iter_epoch(0))
    g = batch.group_size
    assert g == 4 and len(batch) == 11 and len(batch.passages) == 11 * g
    table = {r["sample_id"]: r for r in data.table.to_pylist()}
    for i, sid in enumerate(batch.sample_ids):
        row = table[sid]
        group = batch.passages[i * g:(i + 1) * g]
        assert group[0] in row["pos"] and all(n in row["neg"] for n in group[1:])
        assert batch.queries[i] == row["query"] and batch.prompts[i] == BIO_PROMPT
    assert batch.has_reasoning.count(False) == 2
    # the row with 2 negatives needed 3: repeated, counted and logged
    assert batch.n_repeated_groups == 1 and planner.n_repeated_groups == 1 and planner.n_groups == 11
    assert "1 of 11 groups repeat negatives" in caplog.text
    # deterministic: a fresh planner (another process) draws the same groups; resuming skips steps
    again = next(BatchPlanner(data, cfg, world_size=1, seed=3).iter_epoch(0))
    assert again.passages == batch.passages
    assert list(planner.iter_epoch(0, start_step=1)) == []


def test_groups_do_not_depend_on_world_size(release_dir):
    cfg = TrainDataConfig(paths=[str(release_dir)], domains=["leetcode"], batch_size=1, train_group_size=3)
    data = read_training_data(cfg)

    def groups(world: int) -> dict[str, list[str]]:
        out = {}
        for r in range(world):
            for b in BatchPlanner(data, cfg, world_size=world, rank=r, seed=11).iter_epoch(0):
                assert b.group_size == 3  # override beats the data's 2
                for i, sid in enumerate(b.sample_ids):
                    out[sid] = b.passages[i * 3:(i + 1) * 3]
        return out

    one, three = groups(1), groups(3)
    assert len(one) == len(three) == 9 and one == three


def test_conflicting_domain_sizes_and_too_small_data(tmp_path):
    rows = [release_row("bio", 0, group=4), release_row("bio", 1, group=8)]
    cfg = TrainDataConfig(paths=[str(write_jsonl(tmp_path / "bio.jsonl", rows))])
    with pytest.raises(DataError, match=r"domain 'bio': rows disagree on train_group_size \(\[4, 8\]\)"):
        BatchPlanner(read_training_data(cfg), cfg)
    fixed = cfg.model_copy(update={"train_group_size": 4})
    data = read_training_data(fixed)
    assert BatchPlanner(data, fixed, world_size=1).steps_per_epoch() == 1  # batch 2, 2 rows
    with pytest.raises(DataError, match="no domain has enough samples for one global batch with world_size 2"):
        BatchPlanner(data, fixed, world_size=2).schedule(0)


def test_release_pony_group_of_64_from_5_negatives(release_dir):
    cfg = TrainDataConfig(paths=[str(release_dir)], domains=["pony"])
    data = read_training_data(cfg)
    [batch] = list(BatchPlanner(data, cfg, world_size=1, seed=0).iter_epoch(0))
    assert (len(batch), batch.group_size, len(batch.passages)) == (2, 64, 128)  # the paper's pony setting
    assert batch.n_repeated_groups == 2 and batch.has_reasoning == [False, False]
    for i in range(2):
        negs = Counter(batch.passages[i * 64 + 1:(i + 1) * 64])
        assert len(negs) == 5 and max(negs.values()) <= math.ceil(63 / 5)
