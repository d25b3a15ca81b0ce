"""Loaders on the real shared data, hub-shaped row files built from it, and deliberately broken copies."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reasonembed.data import (
    BRIGHT_INSTRUCTIONS,
    BRIGHT_TASKS,
    R2MED_INSTRUCTIONS,
    R2MED_TASKS,
    DataError,
    DataWarning,
    expand_specs,
    load_beir_folder,
    load_bright,
    load_r2med,
    load_task,
)
from reasonembed.data.beir import doc_text
from reasonembed.data.readers import read_qrels

SCIFACT_CORPUS_SHA = "e28af6052279c7b14bd5fc5be60c710c8c282b8b82452d3dfeaaadd355ebef8e"  # its SOURCE.md


def read_jsonl(path: Path, n: int | None = None) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            out.append(json.loads(line))
            if n is not None and len(out) == n:
                break
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_qrels(path: Path, rows: list[tuple[str, str, int]], header: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] if header else []
    lines += [f"{q}\t{d}\t{r}" for q, d, r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def scifact_small(data_dir, tmp_path_factory):
    """A 40-query slice of SciFact in BEIR's original layout: `_id`, `title`, `text` = abstract, qrels/test.tsv."""
    src = data_dir / "beir" / "scifact"
    qrels = read_qrels(src / "qrels.tsv")
    queries = [q for q in read_jsonl(src / "queries.jsonl") if q["id"] in qrels][:40]
    wanted = {d for q in queries for d in qrels[q["id"]]}
    docs = [d for d in read_jsonl(src / "corpus.jsonl") if d["id"] in wanted]
    docs += [d for d in read_jsonl(src / "corpus.jsonl", 200) if d["id"] not in wanted]
    root = tmp_path_factory.mktemp("scifact_beir")
    write_jsonl(
        root / "corpus.jsonl",
        [{"_id": d["id"], "title": d["title"], "text": d["text"][len(d["title"]) + 1 :], "metadata": {}} for d in docs],
    )
    write_jsonl(root / "queries.jsonl", [{"_id": q["id"], "text": q["text"], "metadata": {}} for q in queries])
    write_qrels(root / "qrels" / "test.tsv", [(q["id"], d, r) for q in queries for d, r in qrels[q["id"]].items()])
    return root, {d["id"]: d["text"] for d in docs}


# ------------------------------------------------------------------------------------------------ BEIR layout


def test_scifact_shared_folder(data_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # the real folder is clean
        task = load_task("beir/scifact", data_dir)
    s = task.summary()
    assert (s["n_docs"], s["n_queries"], s["n_qrels"]) == (5183, 300, 339)
    assert task.metadata["files"]["corpus.jsonl"] == SCIFACT_CORPUS_SHA
    assert task.metadata["revision"].startswith("sha256:")
    i = task.corpus.ids.index("4983")
    title = task.corpus.titles[i]
    # title + " " + abstract exactly once (MTEB's convention), not a doubled title
    assert task.corpus.texts[i].startswith(title + " Alterations of the architecture")
    assert task.corpus.texts[i].count(title) == 1


def test_beir_original_layout_gives_the_same_texts(scifact_small):
    root, shared_texts = scifact_small
    task = load_beir_folder(root, name="scifact-slice")
    assert len(task.queries) == 40 and task.name == "scifact-slice"
    assert task.corpus.texts == [shared_texts[d] for d in task.corpus.ids]
    assert "metadata" not in task.corpus.texts[0]


def test_title_modes():
    assert doc_text("T", "body") == "T body"
    assert doc_text("T", "T body") == "T body", "auto does not double a title already in the text"
    assert doc_text("T", "T body", "prepend") == "T T body"
    assert doc_text("T", "body", "none") == "body"
    assert doc_text("", "  body ") == "  body ", "no title: text unchanged"


def test_impliret_folders(data_dir):
    for name in ("wknow-multispeaker", "temporal-multispeaker", "arithmetic-multispeaker"):
        task = load_task(f"impliret/{name}", data_dir)
        assert task.benchmark == "impliret"
        assert len(task.corpus) == len(task.queries) == 1500
        assert all(len(v) == 1 for v in task.qrels.values())


# --------------------------------------------------------------------------------------------------- BRIGHT


def test_bright_local_queries_only(data_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # qrels.tsv agrees with gold_ids
        task = load_bright("leetcode", data_dir=data_dir / "bright", require_corpus=False)
    assert task.instruction == BRIGHT_INSTRUCTIONS["leetcode"]
    assert task.instruction.startswith("Given a Coding problem")
    assert len(task.queries) == 142 and len(task.corpus) == 0
    assert sum(len(v) for v in task.excluded_ids.values()) == 33485
    assert not set(task.excluded_ids) - set(task.qrels)


def test_bright_local_without_corpus_is_an_error(data_dir):
    with pytest.raises(DataError, match="corpus file not found"):
        load_bright("biology", data_dir=data_dir / "bright")


def test_bright_all_tasks_and_instructions(data_dir):
    assert len(BRIGHT_TASKS) == 12 and set(BRIGHT_INSTRUCTIONS) == set(BRIGHT_TASKS)
    assert BRIGHT_INSTRUCTIONS["earth_science"] == (
        "Given an Earth Science post, retrieve relevant passages that help answer the post."
    )
    assert BRIGHT_INSTRUCTIONS["theoremqa_theorems"].endswith("relevant theorems that help answer the problem.")
    assert expand_specs(["bright", "bright/biology", "beir/scifact"])[:2] == ["bright/biology", "bright/earth_science"]
    assert len(expand_specs(["bright", "r2med"])) == 20
    for name in BRIGHT_TASKS:
        task = load_task(f"bright/{name}", data_dir, source="local", require_corpus=False)
        assert task.queries.ids and task.qrels


@pytest.fixture(scope="module")
def bright_hub_files(data_dir, tmp_path_factory):
    """Hub-shaped BRIGHT rows (examples: query/gold_ids/excluded_ids with "N/A"; documents: id/content) written to
    parquet from the real aops queries; documents are the gold and excluded ids plus distractors."""
    rows = read_jsonl(data_dir / "bright" / "aops" / "queries.jsonl", 12)
    examples = []
    for i, r in enumerate(rows):
        ex = r["excluded_ids"][:50] if i % 2 == 0 else ["N/A"]
        examples.append({
            "query": r["text"], "reasoning": r["reasoning"], "id": r["id"], "excluded_ids": ex,
            "gold_ids_long": r["gold_ids_long"], "gold_ids": r["gold_ids"], "gold_answer": r.get("gold_answer", ""),
        })
    doc_ids = dict.fromkeys(d for e in examples for d in e["gold_ids"] + e["excluded_ids"] if d != "N/A")
    docs = [{"id": d, "content": f"solution text of {d}"} for d in doc_ids]
    docs += [{"id": f"distractor_{i}", "content": f"an unrelated problem {i}"} for i in range(20)]
    root = tmp_path_factory.mktemp("bright_hub")
    pq.write_table(pa.Table.from_pylist(examples), root / "examples-aops.parquet")
    pq.write_table(pa.Table.from_pylist(docs), root / "documents-aops.parquet")
    write_jsonl(root / "documents-aops.jsonl", docs)
    return root, examples, docs


def test_bright_hub_rows_parse(bright_hub_files):
    root, examples, docs = bright_hub_files
    task = load_bright("aops", examples_file=root / "examples-aops.parquet", documents_file=root / "documents-aops.parquet")
    assert task.benchmark == "bright" and task.instruction == BRIGHT_INSTRUCTIONS["aops"]
    assert task.queries.ids == [e["id"] for e in examples]
    assert task.queries.texts[0] == examples[0]["query"]
    assert task.qrels[examples[0]["id"]] == {d: 1 for d in examples[0]["gold_ids"]}
    assert task.excluded_ids[examples[0]["id"]] == examples[0]["excluded_ids"]
    assert examples[1]["id"] not in task.excluded_ids, "the N/A placeholder means no exclusion"
    assert len(task.corpus) == len(docs) and task.corpus.texts[0] == docs[0]["content"]
    assert task.metadata["revision"].startswith("sha256:")
    # jsonl rows parse the same; a local folder can take its corpus from a documents file
    same = load_bright("aops", examples_file=root / "examples-aops.parquet", documents_file=root / "documents-aops.jsonl")
    assert same.corpus.ids == task.corpus.ids


def test_bright_folder_with_documents_file(data_dir, bright_hub_files):
    root, _, docs = bright_hub_files
    with pytest.warns(DataWarning, match="qrels rows point at doc ids that are not in the corpus and were dropped"):
        task = load_bright("aops", data_dir=data_dir / "bright", documents_file=root / "documents-aops.parquet")
    # the documents file is a slice: judgements on documents outside it are dropped, and so are queries left with
    # none (counted), since no retriever could ever find those documents
    validation = task.metadata["validation"]
    assert len(task.corpus) == len(docs) and len(task.queries) == 111 - validation.get("queries_without_qrels", 0)
    assert validation["qrels_unknown_docs_dropped"] > 0
    assert all(d in set(task.corpus.ids) for v in task.qrels.values() for d in v)
    docs_sha = task.metadata["files"]["documents"]
    assert docs_sha[:12] in task.metadata["revision"], "the documents file is part of the data revision"


def test_excluded_gold_ids_are_warned(bright_hub_files, tmp_path):
    root, examples, _ = bright_hub_files
    rows = [dict(e) for e in examples]
    rows[0]["excluded_ids"] = rows[0]["excluded_ids"] + rows[0]["gold_ids"][:1]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "examples.parquet")
    with pytest.warns(DataWarning, match="1 \\(query, doc\\) pairs are both excluded and relevant"):
        task = load_bright("aops", examples_file=tmp_path / "examples.parquet", documents_file=root / "documents-aops.jsonl")
    assert task.metadata["validation"]["excluded_gold_ids"] == 1


def test_hub_without_datasets_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match="pip install datasets"):
        load_bright("biology")
    with pytest.raises(DataError, match="pip install datasets"):
        load_r2med("Biology")


def test_unknown_tasks():
    with pytest.raises(DataError, match="unknown BRIGHT task"):
        load_bright("chemistry")
    with pytest.raises(DataError, match="unknown R2MED task"):
        load_r2med("biology")


# ---------------------------------------------------------------------------------------------------- R2MED


def _r2med_rows(data_dir):
    """R2MED-shaped rows made from real SciFact text, with graded scores (R2MED's qrels carry a score)."""
    src = data_dir / "beir" / "scifact"
    qrels = read_qrels(src / "qrels.tsv")
    queries = [q for q in read_jsonl(src / "queries.jsonl") if q["id"] in qrels][:10]
    wanted = {d for q in queries for d in qrels[q["id"]]}
    corpus = [{"id": d["id"], "text": d["text"]} for d in read_jsonl(src / "corpus.jsonl") if d["id"] in wanted]
    qrows = [{"id": q["id"], "text": q["text"]} for q in queries]
    rel = [{"q_id": q["id"], "p_id": d, "score": 1 + i % 2} for i, q in enumerate(queries) for d in qrels[q["id"]]]
    return corpus, qrows, rel


def test_r2med_hub_rows_and_local_folder(data_dir, tmp_path):
    assert len(R2MED_TASKS) == 8 and set(R2MED_INSTRUCTIONS) == set(R2MED_TASKS)
    corpus, queries, rel = _r2med_rows(data_dir)
    for name, rows in (("corpus", corpus), ("query", queries), ("qrels", rel)):
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{name}.parquet")
    task = load_r2med(
        "PMC-Clinical",
        corpus_file=tmp_path / "corpus.parquet", query_file=tmp_path / "query.parquet", qrels_file=tmp_path / "qrels.parquet",
    )
    assert task.instruction == "Given a Clinical Case, retrieve similar cases that help diagnose the case."
    assert task.metadata["max_length"] == 512 and task.benchmark == "r2med"
    assert {r for v in task.qrels.values() for r in v.values()} == {1, 2}, "graded scores are kept"
    # R2MED's release folder: query.jsonl and qrels.txt (whitespace separated, header)
    folder = tmp_path / "r2med" / "Biology"
    write_jsonl(folder / "corpus.jsonl", corpus)
    write_jsonl(folder / "query.jsonl", queries)
    (folder / "qrels.txt").write_text("q_id p_id score\n" + "".join(f"{r['q_id']} {r['p_id']} {r['score']}\n" for r in rel))
    local = load_task("r2med/Biology", tmp_path)
    assert local.qrels == task.qrels and local.corpus.texts == task.corpus.texts
    with pytest.raises(DataError, match="row files for"):
        load_r2med("Biology", corpus_file=tmp_path / "corpus.parquet")


# ----------------------------------------------------------------------------------------------- bad input


def _copy(scifact_small, tmp_path) -> Path:
    src, _ = scifact_small
    dst = tmp_path / "task"
    (dst / "qrels").mkdir(parents=True)
    for rel in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        (dst / rel).write_bytes((src / rel).read_bytes())
    return dst


def test_missing_qrels_is_an_error(scifact_small, tmp_path):
    d = _copy(scifact_small, tmp_path)
    (d / "qrels" / "test.tsv").unlink()
    with pytest.raises(DataError, match="no qrels file"):
        load_beir_folder(d)


def test_missing_corpus_is_an_error(scifact_small, tmp_path):
    d = _copy(scifact_small, tmp_path)
    (d / "corpus.jsonl").unlink()
    with pytest.raises(DataError, match="corpus file not found"):
        load_beir_folder(d)


def test_unjudged_queries_are_dropped_with_a_count(scifact_small, tmp_path):
    d = _copy(scifact_small, tmp_path)
    rows = read_jsonl(d / "queries.jsonl")
    rows += [{"_id": "extra1", "text": "an unjudged claim"}, {"_id": "extra2", "text": "another"}]
    write_jsonl(d / "queries.jsonl", rows)
    with pytest.warns(DataWarning, match="2 queries have no relevance judgements"):
        task = load_beir_folder(d)
    assert len(task.queries) == 40 and "extra1" not in task.queries.ids
    assert task.metadata["validation"]["queries_without_qrels"] == 2


def test_unknown_ids_in_qrels_are_counted(scifact_small, tmp_path):
    d = _copy(scifact_small, tmp_path)
    with open(d / "qrels" / "test.tsv", "a") as f:
        f.write("ghost-query\t4983\t1\n")
        q0 = read_jsonl(d / "queries.jsonl", 1)[0]["_id"]
        f.write(f"{q0}\tno-such-doc\t1\n{q0}\tno-such-doc-2\t2\n")
    with pytest.warns(DataWarning) as caught:
        task = load_beir_folder(d)
    text = " ".join(str(w.message) for w in caught)
    assert "1 qrels query ids are not among the queries" in text
    assert "2 qrels rows point at doc ids that are not in the corpus and were dropped (2 distinct ids)" in text
    assert "ghost-query" not in task.qrels
    assert "no-such-doc" not in task.qrels[q0] and "no-such-doc-2" not in task.qrels[q0]
    assert task.metadata["validation"]["qrels_unknown_docs_dropped"] == 2


def test_duplicate_ids_are_errors(scifact_small, tmp_path):
    d = _copy(scifact_small, tmp_path)
    rows = read_jsonl(d / "corpus.jsonl")
    write_jsonl(d / "corpus.jsonl", rows + rows[:3])
    with pytest.raises(DataError, match="3 duplicate doc ids"):
        load_beir_folder(d)
    d2 = _copy(scifact_small, tmp_path / "b")
    rows = read_jsonl(d2 / "queries.jsonl")
    write_jsonl(d2 / "queries.jsonl", rows + rows[:1])
    with pytest.raises(DataError, match="1 duplicate query ids"):
        load_beir_folder(d2)


def test_empty_texts_are_warned(scifact_small, tmp_path):
    d = _copy(scifact_small, tmp_path)
    rows = read_jsonl(d / "corpus.jsonl")
    rows[0]["title"], rows[0]["text"] = "", "  "
    write_jsonl(d / "corpus.jsonl", rows)
    q = read_jsonl(d / "queries.jsonl")
    q[0]["text"] = ""
    write_jsonl(d / "queries.jsonl", q)
    with pytest.warns(DataWarning) as caught:
        task = load_beir_folder(d)
    text = " ".join(str(w.message) for w in caught)
    assert "1 documents have empty text" in text and "1 queries have empty text" in text
    assert task.metadata["validation"]["empty_doc_texts"] == 1


def test_malformed_files_name_file_and_line(scifact_small, tmp_path):
    d = _copy(scifact_small, tmp_path)
    with open(d / "corpus.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:\d+: not valid JSON"):
        load_beir_folder(d)
    d = _copy(scifact_small, tmp_path / "b")
    with open(d / "queries.jsonl", "a") as f:
        f.write(json.dumps({"text": "no id"}) + "\n")
    with pytest.raises(DataError, match="record has no id"):
        load_beir_folder(d)
    d = _copy(scifact_small, tmp_path / "c")
    with open(d / "qrels" / "test.tsv", "a") as f:
        f.write("1\t4983\thigh\n")
    with pytest.raises(DataError, match="relevance 'high' is not a number"):
        load_beir_folder(d)
    d = _copy(scifact_small, tmp_path / "d")
    with open(d / "qrels" / "test.tsv", "a") as f:
        f.write("1\t4983\t0.5\n")
    with pytest.raises(DataError, match="not an integer"):
        load_beir_folder(d)


def test_qrels_formats_and_conflicts(tmp_path):
    trec = tmp_path / "qrels.trec"
    trec.write_text("q1 0 d1 2\nq1 0 d2 0\nq2 0 d1 1\n")
    assert read_qrels(trec) == {"q1": {"d1": 2, "d2": 0}, "q2": {"d1": 1}}
    plain = write_qrels(tmp_path / "plain.tsv", [("q1", "d1", 1), ("q1", "d1", 1)], header=False)
    with pytest.warns(DataWarning, match="1 duplicate qrels rows"):
        assert read_qrels(plain) == {"q1": {"d1": 1}}
    conflict = write_qrels(tmp_path / "conflict.tsv", [("q1", "d1", 1), ("q1", "d1", 2)])
    with pytest.raises(DataError, match="judged twice with different relevance"):
        read_qrels(conflict)


def test_no_judgements_at_all_is_an_error(scifact_small, tmp_path):
    d = _copy(scifact_small, tmp_path)
    write_qrels(d / "qrels" / "test.tsv", [("nobody", "4983", 1)])
    with pytest.raises(DataError, match="no query has relevance judgements"), pytest.warns(DataWarning):
        load_beir_folder(d)


def test_limit_queries(data_dir):
    task = load_task("impliret/temporal-multispeaker", data_dir).limit_queries(25)
    assert len(task.queries) == 25 and set(task.qrels) == set(task.queries.ids)
    assert len(task.corpus) == 1500


def test_catalog_falls_back_to_the_hub_with_a_clear_error(data_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"has no corpus.jsonl, and loading from the hub failed: .*pip install datasets"):
        load_task("bright/biology", data_dir)
    with pytest.raises(DataError, match="expected '<benchmark>/<task>'"):
        load_task("scifact", data_dir)
    with pytest.raises(DataError, match="not found"):
        load_task("beir/nfcorpus", data_dir)


# ------------------------------------------------------------------------------------------ per-query instructions


def test_per_query_instructions_stay_aligned(scifact_small, tmp_path):
    d = _copy(scifact_small, tmp_path)
    rows = read_jsonl(d / "queries.jsonl")
    rows[1]["instruction"], rows[3]["instruction"] = "Find the abstract supporting the claim", "Refute the claim"
    rows.insert(2, {"_id": "unjudged", "text": "dropped", "instruction": "never seen"})
    write_jsonl(d / "queries.jsonl", rows)
    with pytest.warns(DataWarning, match="1 queries have no relevance judgements"):
        task = load_beir_folder(d)
    by_id = dict(zip(task.queries.ids, task.queries.instructions, strict=True))
    assert "unjudged" not in by_id and len(by_id) == 40
    assert by_id[rows[1]["_id"]] == "Find the abstract supporting the claim"
    assert by_id[rows[4]["_id"]] == "Refute the claim" and by_id[rows[0]["_id"]] is None
    small = task.limit_queries(3)
    assert small.queries.instructions == task.queries.instructions[:3]
    assert load_beir_folder(_copy(scifact_small, tmp_path / "plain")).queries.instructions is None


def test_non_string_instruction_is_an_error(scifact_small, tmp_path):
    d = _copy(scifact_small, tmp_path)
    rows = read_jsonl(d / "queries.jsonl")
    rows[2]["instruction"] = ["not", "a", "string"]
    write_jsonl(d / "queries.jsonl", rows)
    with pytest.raises(DataError, match=r"queries.jsonl:3: field 'instruction' must be a string, got list"):
        load_beir_folder(d)
