"""Issue 15 item 4: every common variant of the BEIR layout loads to the same task, and bad input says where and why.

The variants are built from real SciFact data (the shared ``beir/scifact`` folder): every test query's judgements,
the documents they need and ~500 others. Each variant is written the way users' folders come (``_id`` or ``id``,
title split out or not, ``qrels.tsv`` or ``qrels/test.tsv``, header or none, TREC columns, ``.jsonl`` /
``.jsonl.gz`` / ``.parquet``, a local folder or an S3 prefix on a real moto server) and must load to the same ids,
texts and qrels as the canonical folder, and give the same BM25 scores.
"""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reasonembed.config.base import StorageConfig
from reasonembed.data import DataError, DataWarning, RetrievalTask, load_beir_folder, load_task
from reasonembed.evaluation.bm25 import bm25_run
from reasonembed.evaluation.metrics import evaluate
from reasonembed.storage import Location

N_OTHER_DOCS = 500


def _jsonl_lines(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def scifact_records(data_dir) -> dict:
    """Real SciFact records: docs (id, title, full text), queries (id, text), qrels rows (qid, docid, score)."""
    src = data_dir / "beir" / "scifact"
    rows = [line.split("\t") for line in (src / "qrels.tsv").read_text().splitlines()[1:] if line.strip()]
    qids = list(dict.fromkeys(r[0] for r in rows))[:300]
    qrels_rows = [(q, d, int(s)) for q, d, s in rows if q in set(qids)]
    wanted = {d for _, d, _ in qrels_rows}
    docs, others = [], 0
    for d in _jsonl_lines(src / "corpus.jsonl"):
        if d["id"] in wanted or others < N_OTHER_DOCS:
            others += d["id"] not in wanted
            docs.append(d)
    queries = [q for q in _jsonl_lines(src / "queries.jsonl") if q["id"] in set(qids)]
    assert all(d["text"].startswith(d["title"] + " ") for d in docs), "shared SciFact stores text = title + abstract"
    return {"docs": docs, "queries": queries, "qrels": qrels_rows}


# ----------------------------------------------------------------------------------------------- writers


def _write_table(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
        return
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def _write_qrels(path: Path, rows: list[tuple], *, header: str | None, trec: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [header] if header else []
    lines += [f"{q} 0 {d} {s}" if trec else f"{q}\t{d}\t{s}" for q, d, s in rows]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def _docs(records: dict, id_key: str, split_title: bool) -> list[dict]:
    if split_title:  # BEIR's release: title apart, text = the abstract alone
        return [{id_key: d["id"], "title": d["title"], "text": d["text"][len(d["title"]) + 1 :]}
                for d in records["docs"]]
    return [{id_key: d["id"], "text": d["text"]} for d in records["docs"]]


# name -> (corpus file, queries file, id key, title split out, qrels file, qrels header, TREC columns)
VARIANTS = {
    "canonical": ("corpus.jsonl", "queries.jsonl", "id", False, "qrels.tsv", "query-id\tcorpus-id\tscore", False),
    "beir_release": ("corpus.jsonl", "queries.jsonl", "_id", True, "qrels/test.tsv", "query-id\tcorpus-id\tscore",
                     False),
    "no_header": ("corpus.jsonl", "queries.jsonl", "id", True, "qrels.tsv", None, False),
    "qid_docid_header": ("corpus.jsonl", "query.jsonl", "_id", False, "qrels/test.tsv", "qid docid score", False),
    "gzipped": ("corpus.jsonl.gz", "queries.jsonl.gz", "_id", True, "qrels/test.tsv.gz", None, False),
    "parquet": ("corpus.parquet", "queries.parquet", "_id", True, "qrels.tsv", "query-id\tcorpus-id\tscore", False),
    "trec": ("corpus.parquet", "queries.jsonl", "id", False, "qrels/test.tsv", None, True),
}


def write_variant(root: Path, records: dict, variant: str) -> Path:
    corpus, queries, id_key, split_title, qrels, header, trec = VARIANTS[variant]
    folder = root / variant
    _write_table(folder / corpus, _docs(records, id_key, split_title))
    _write_table(folder / queries, [{id_key: q["id"], "text": q["text"]} for q in records["queries"]])
    _write_qrels(folder / qrels, records["qrels"], header=header, trec=trec)
    return folder


@pytest.fixture(scope="module")
def variants(scifact_records, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {v: write_variant(root, scifact_records, v) for v in VARIANTS}


@pytest.fixture(scope="module")
def canonical(variants) -> RetrievalTask:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # the slice is clean: any warning is a loader bug
        return load_beir_folder(variants["canonical"], name="scifact")


def assert_same_task(task: RetrievalTask, ref: RetrievalTask) -> None:
    assert task.corpus.ids == ref.corpus.ids
    assert task.corpus.texts == ref.corpus.texts
    assert task.queries.ids == ref.queries.ids
    assert task.queries.texts == ref.queries.texts
    assert task.qrels == ref.qrels


# ----------------------------------------------------------------------------------------------- variants


def test_canonical_slice_is_real_scifact(canonical, scifact_records):
    assert len(canonical.queries) == 300 and len(canonical.corpus) == len(scifact_records["docs"])
    assert sum(len(v) for v in canonical.qrels.values()) == len(scifact_records["qrels"])


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "canonical"])
def test_every_layout_variant_loads_the_same_task(variants, canonical, variant):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        task = load_beir_folder(variants[variant], name="scifact")
    assert_same_task(task, canonical)
    # a folder given as a task spec loads whatever its queries file is called
    assert_same_task(load_task(str(variants[variant])), canonical)


def test_s3_folder_loads_the_same_task(s3_server, variants, canonical):
    for variant in ("beir_release", "parquet"):
        prefix = f"s3://reasonembed/layouts/{variant}"
        dest = Location(prefix, StorageConfig(s3_endpoint=s3_server))
        for f in sorted(variants[variant].rglob("*")):
            if f.is_file():
                dest.upload_file(f, f.relative_to(variants[variant]).as_posix())
        dest.write_bytes("notes/unrelated.bin", b"not part of the layout")  # other objects are not downloaded
        task = load_task(prefix, storage=StorageConfig(s3_endpoint=s3_server))
        assert_same_task(task, canonical)
        assert task.name == variant and task.metadata["source"] == prefix
    with pytest.raises(DataError, match="task folder not found: s3://reasonembed/layouts/nothing-here"):
        load_task("s3://reasonembed/layouts/nothing-here", storage=StorageConfig(s3_endpoint=s3_server))


def test_s3_errors_name_the_s3_object(s3_server, variants, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for f in ("corpus.jsonl", "queries.jsonl", "qrels.tsv"):
        (folder / f).write_bytes((variants["canonical"] / f).read_bytes())
    with open(folder / "queries.jsonl", "a") as fh:
        fh.write("{broken\n")
    dest = Location("s3://reasonembed/layouts/bad", StorageConfig(s3_endpoint=s3_server))
    for f in folder.iterdir():
        dest.upload_file(f, f.name)
    with pytest.raises(DataError, match=r"^s3://reasonembed/layouts/bad/queries.jsonl:301: not valid JSON"):
        load_beir_folder(dest)


def test_bm25_scores_are_the_same_whatever_the_layout(variants, canonical):
    ref = evaluate(canonical.qrels, bm25_run(canonical, k=100))
    assert ref["ndcg_at_10"] > 0.5, "BM25 on SciFact scores ~0.67 nDCG@10; a broken slice would not"
    for variant in ("beir_release", "gzipped", "parquet"):
        task = load_beir_folder(variants[variant])
        got = evaluate(task.qrels, bm25_run(task, k=100))
        assert got.mean == ref.mean and got.n_queries == ref.n_queries == 300


def test_two_variants_of_one_file_are_ambiguous(variants, scifact_records, tmp_path):
    folder = write_variant(tmp_path, scifact_records, "canonical")
    _write_table(folder / "corpus.parquet", _docs(scifact_records, "_id", True))
    with pytest.raises(DataError, match="ambiguous corpus file: both corpus.jsonl and corpus.parquet"):
        load_beir_folder(folder)
    (folder / "corpus.parquet").unlink()
    _write_qrels(folder / "qrels" / "test.tsv", scifact_records["qrels"], header=None)
    with pytest.raises(DataError, match="ambiguous qrels file: both qrels.tsv and qrels/test.tsv"):
        load_beir_folder(folder)


# ----------------------------------------------------------------------------------------------- errors


def _broken(variants, tmp_path, variant: str = "canonical") -> Path:
    dst = tmp_path / "broken"
    for f in variants[variant].rglob("*"):
        if f.is_file():
            (dst / f.relative_to(variants[variant])).parent.mkdir(parents=True, exist_ok=True)
            (dst / f.relative_to(variants[variant])).write_bytes(f.read_bytes())
    return dst


def test_bad_json_line_names_file_and_line(variants, tmp_path):
    d = _broken(variants, tmp_path, "gzipped")
    lines = gzip.decompress((d / "corpus.jsonl.gz").read_bytes()).decode().splitlines()
    lines[6] = '{"_id": "x", "text": '
    (d / "corpus.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(DataError, match=r"corpus.jsonl.gz:7: not valid JSON .*expected one JSON object per line"):
        load_beir_folder(d)


def test_record_without_id_names_file_and_row(variants, tmp_path):
    d = _broken(variants, tmp_path, "parquet")
    rows = pq.read_table(d / "queries.parquet").to_pylist()
    rows[4]["_id"] = None
    pq.write_table(pa.Table.from_pylist(rows), d / "queries.parquet")
    with pytest.raises(DataError, match=r"queries.parquet:row 5: record has no id \(expected one of \['id', '_id'\]\)"):
        load_beir_folder(d)


def test_qrels_line_with_two_columns(variants, tmp_path):
    d = _broken(variants, tmp_path)
    with open(d / "qrels.tsv", "a") as f:
        f.write("1\t31715818\n")
    n = len((d / "qrels.tsv").read_text().splitlines())
    with pytest.raises(DataError, match=rf"qrels.tsv:{n}: expected 3 columns \(query-id corpus-id score\) or 4 "
                                        r"\(TREC: qid 0 docid score\), got 2"):
        load_beir_folder(d)


def test_non_integer_score_after_the_first_line(variants, tmp_path):
    d = _broken(variants, tmp_path, "no_header")
    lines = (d / "qrels.tsv").read_text().splitlines()
    lines[2] = lines[2].rsplit("\t", 1)[0] + "\trelevant"
    (d / "qrels.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"qrels.tsv:3: relevance 'relevant' is not a number; expected an integer"):
        load_beir_folder(d)


def test_header_only_on_the_first_non_blank_line(tmp_path):
    from reasonembed.data.readers import read_qrels

    p = tmp_path / "qrels.tsv"
    p.write_text("\nqid\tdocid\trel\nq1\td1\t1\n")
    assert read_qrels(p) == {"q1": {"d1": 1}}
    p.write_text("q1\td1\t1\nqid\tdocid\trel\n")
    with pytest.raises(DataError, match=r"qrels.tsv:2: relevance 'rel' is not a number"):
        read_qrels(p)


def test_unknown_doc_ids_are_dropped_with_a_count(variants, canonical, tmp_path):
    d = _broken(variants, tmp_path)
    q0, q1 = canonical.queries.ids[:2]
    with open(d / "qrels.tsv", "a") as f:
        f.write(f"{q0}\tno-such-doc\t1\n{q1}\tno-such-doc\t1\n{q1}\tgone-too\t0\n")
    with pytest.warns(DataWarning) as caught:
        task = load_beir_folder(d, name="scifact")
    texts = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert texts == ["scifact: 3 qrels rows point at doc ids that are not in the corpus and were dropped "
                     "(2 distinct ids) (e.g. 'gone-too', 'no-such-doc')"], "warned once, with the count"
    assert task.metadata["validation"]["qrels_unknown_docs_dropped"] == 3
    assert task.qrels == canonical.qrels


def test_a_query_judged_only_on_unknown_docs_is_dropped(variants, canonical, tmp_path):
    d = _broken(variants, tmp_path)
    rows = [json.loads(x) for x in (d / "queries.jsonl").read_text().splitlines()]
    rows.append({"id": "orphan", "text": "a claim judged only against missing abstracts"})
    (d / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(d / "qrels.tsv", "a") as f:
        f.write("orphan\tno-such-doc\t1\n")
    with pytest.warns(DataWarning, match="1 queries have no relevance judgements"):
        task = load_beir_folder(d)
    assert "orphan" not in task.queries.ids and task.metadata["validation"]["qrels_unknown_docs_dropped"] == 1
