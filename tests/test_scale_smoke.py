"""What the scale bench (bench/scale.py) found, kept as regressions at a small size: the encode job reads its corpus
once however many rounds it takes, and FAISS indexes are built from parts streamed in bounded batches."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from reasonembed.config.encode import EncodeJobConfig, IndexConfig
from reasonembed.index import encode
from reasonembed.index.faiss_index import TRAIN_PER_LIST, IndexSpec, SearchIndex, _train_samples
from reasonembed.index.reader import stable_shard
from reasonembed.storage import open_run

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import scale_corpus  # noqa: E402


def _counting_builder(texts: list[str], ids: list[str], log: Path, bad):
    """A corpus dataset builder whose normalising step appends the rows it saw to ``log`` (one line per batch,
    written by the Ray worker that ran it): the number of times the corpus was read, measured for real. Rows for
    which ``bad(index, shard)`` holds become input errors ("empty text")."""
    import ray

    def build(n_shards: int):
        def norm(batch):
            with log.open("a") as f:
                f.write(f"{len(batch['id'])}\n")
            shard = np.array([stable_shard(str(i), n_shards) for i in batch["id"]], np.int64)
            error = np.array(["empty text" if bad(int(i[1:]), s) else "" for i, s in zip(batch["id"], shard,
                                                                                         strict=True)], object)
            return {"doc_id": batch["id"], "text": batch["text"], "error": error, "shard": shard}
        return ray.data.from_items([{"id": i, "text": t} for i, t in zip(ids, texts, strict=True)]).map_batches(
            norm, batch_format="numpy")
    return build


def _embed_actors_started() -> int:
    """EmbedActor processes this Ray cluster has started so far, dead or alive. ``ray._private.state`` reads the
    GCS directly; the public ``ray.util.state`` needs the dashboard, which the test cluster does not run."""
    from ray._private.state import actors

    return sum("EmbedActor" in a["ActorClassName"] for a in actors().values())


def test_corpus_is_read_once_and_one_actor_pool_serves_a_group_of_rounds(ray_local, tmp_path):
    """400 documents in 8 shards of 50, 2 shards a round: 4 rounds, one of them only input errors, and some error
    rows in the others; 2 rounds a pool. Before the staging fix every round re-read and re-parsed the whole corpus
    (twice: error rows, then embedded rows): the job was quadratic in the corpus size. Before the grouped stream each
    round started its own actor pool (a model load per round; 32 at 1M documents). Now the corpus is read once,
    staged by round, read back as one stream per group of rounds in round order through one actor, every id lands
    once (in a part or in errors/), and the staging is removed at the end."""
    n = 400
    scale_corpus.write_synthetic(str(tmp_path / "c"), n)
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "c" / "part-00000.parquet")
    ids = table.column("id").to_pylist()
    log = tmp_path / "reads.txt"
    cfg = EncodeJobConfig(out=str(tmp_path / "out"), run_id="t", embedder={"model": "minilm", "max_length": 16},
                          engine={"rows_per_shard": 50, "shards_per_round": 2, "rounds_per_pool": 2},
                          index={"build": False})
    bad = lambda i, shard: shard // 2 == 1 or i % 9 == 0  # noqa: E731
    expected_bad = {d for d in ids if bad(int(d[1:]), stable_shard(d, 8))}
    actors_before = _embed_actors_started()
    summary = encode.run(cfg, dataset_builder=_counting_builder(table.column("text").to_pylist(), ids, log, bad),
                         n_rows=n, inputs={"synthetic": str(n)})
    rows_read = sum(int(x) for x in log.read_text().split())
    assert rows_read == n, f"the corpus was read {rows_read / n:.1f} times"
    assert _embed_actors_started() - actors_before == 2, "one pool of one actor for each 2 of the 4 rounds"
    stage = open_run(str(tmp_path / "out"), "t").stage("encode")
    good = stage.read_parts(columns=["doc_id"]).column("doc_id").to_pylist()
    errors = stage.read_errors().column("doc_id").to_pylist()
    assert len(stage.parts()) == 8, "every shard has its part, the all-error round's too"
    assert len(good) == len(set(good)) == summary.rows == n - len(expected_bad)
    assert sorted(errors) == sorted(expected_bad) and set(good) | set(errors) == set(ids)
    assert not stage.exists(encode.STAGED)


def _clustered(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(32, d))[rng.integers(0, 32, n)] + 0.1 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_streamed_build_matches_in_memory_build_and_bounds_the_training_sample():
    """The streamed build (batches of uneven size, cut across shard boundaries) gives the exact index the
    in-memory build gives; IVF trains on a strided sample of at most TRAIN_PER_LIST vectors per list."""
    x = _clustered(5000)
    ids = [f"d{i}" for i in range(len(x))]
    cuts = [0, 700, 1900, 2000, 3333, 5000]

    def batches():
        return ((ids[a:b], x[a:b]) for a, b in zip(cuts, cuts[1:], strict=False))

    q = x[::97]
    for spec in (IndexSpec(kind="flat", shard_size=1500), IndexSpec(kind="hnsw", shard_size=2500)):
        streamed = SearchIndex.build_streamed(batches, len(x), x.shape[1], spec)
        ref = SearchIndex.build(x, ids, spec)
        assert streamed.offsets == ref.offsets and streamed.doc_ids == ids
        if spec.kind == "flat":
            assert streamed.search(q, 10) == ref.search(q, 10)
    ivf = IndexSpec(kind="ivf", ivf_nlist=8, ivf_nprobe=8)
    samples = _train_samples(batches, [len(x)], ivf, x.shape[1])
    assert 0 < len(samples[0]) <= TRAIN_PER_LIST * 8
    streamed = SearchIndex.build_streamed(batches, len(x), x.shape[1], ivf)
    exact = SearchIndex.build(x, ids, IndexSpec(kind="flat"))
    got = [{d for d, _ in h} for h in streamed.search(q, 10)]
    want = [{d for d, _ in h} for h in exact.search(q, 10)]
    assert np.mean([len(a & b) / 10 for a, b in zip(got, want, strict=True)]) >= 0.95
    with pytest.raises(ValueError, match="not the 4999 announced"):
        SearchIndex.build_streamed(batches, 4999, x.shape[1], IndexSpec())


def test_build_index_streams_the_parts(ray_local, tmp_path):
    """The encode job's index (``build_index``) is built from its parts one at a time and finds what the
    in-memory build over ``load_embeddings`` finds."""
    scale_corpus.write_synthetic(str(tmp_path / "c"), 300)
    cfg = EncodeJobConfig(out=str(tmp_path / "out"), run_id="t", data={"path": str(tmp_path / "c")},
                          embedder={"model": "minilm", "max_length": 16}, engine={"rows_per_shard": 50},
                          index={"build": False})
    encode.run(cfg)
    stage = open_run(str(tmp_path / "out"), "t").stage("encode")
    uri = encode.build_index(stage, IndexConfig(kind="flat"), {}, None)
    ids, x = encode.load_embeddings(stage)
    built = SearchIndex.load(uri)
    assert built.doc_ids == ids and built.search(x[:20], 5) == SearchIndex.build(x, ids).search(x[:20], 5)


def _private_mb() -> float:
    import psutil

    m = psutil.Process().memory_info()
    return (m.rss - m.shared) / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_trim_heap_gives_freed_heap_pages_back():
    """What keeps the one long-lived EmbedActor flat: 160 MB of heap blocks (64 KiB each, under glibc's mmap
    threshold, so they come from the heap) are written and freed except the last one, which pins the heap's top so
    glibc cannot shrink it on its own; the freed pages stay in the process until ``trim_heap`` returns them."""
    import ctypes
    import ctypes.util

    from reasonembed.heap import trim_heap

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 1024
    trim_heap()
    before = _private_mb()
    blocks = [libc.malloc(size) for _ in range(2560)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in blocks[:-1]:
        libc.free(b)
    held = _private_mb()
    assert trim_heap() is True
    after = _private_mb()
    libc.free(blocks[-1])
    assert held - before > 120, f"the freed blocks stay in the process: {before:.0f} -> {held:.0f} MB"
    assert held - after > 120, f"trim_heap returned them: {held:.0f} -> {after:.0f} MB"
