"""Fast ReMixer tests: parsers (crafted strings), prompts, ids, config validation, and stage 0 on real files
(decontamination against the real BRIGHT gold ids, dedup, length filter, bad records, seeded sampling).
Stages that need vLLM are in test_remixer_pipeline.py (slow)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from reasonembed.config.base import ConfigError, load_model
from reasonembed.config.synthesize import MineConfig, SynthesizeJobConfig
from reasonembed.remixer import format as format_stage
from reasonembed.remixer import prepare
from reasonembed.remixer.context import Context
from reasonembed.remixer.generate import generation_requests, unique_queries
from reasonembed.remixer.ids import content_hash, shard_domain, shard_name
from reasonembed.remixer.mine import format_query, select_candidates
from reasonembed.remixer.parsing import clean_query, parse_query, parse_score, parse_yes_no
from reasonembed.remixer.prompts import annotation_prompt, generation_prompt, profile_for, reasoning_prompt

REPO = Path(__file__).resolve().parents[1]


# ---- parsing -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("Analysis ... so the document is relevant.\n<score>4</score>", (4, None)),
        ("<score> 5 </score>", (5, None)),
        ("<score>\n2\n</score>", (2, None)),
        ("first I thought <score>2</score> but finally <score>3</score>", (3, None)),  # the last tag counts
        ("no tag at all, the relevance is 4", (None, "no_score_tag")),
        ("cut off by max_tokens <score>4", (None, "no_score_tag")),
        ("<score>3.5</score>", (None, "no_score_tag")),
        ("<score>five</score>", (None, "no_score_tag")),
        ("<score></score>", (None, "no_score_tag")),
        ("<score>0</score>", (None, "score_out_of_range")),
        ("<score>6</score>", (None, "score_out_of_range")),
        ("<score>10</score>", (None, "score_out_of_range")),
        ("", (None, "empty_output")),
        ("   \n ", (None, "empty_output")),
    ],
)
def test_parse_score_crafted(text, expected):
    assert parse_score(text) == expected


def test_parse_score_custom_pattern_and_range():
    assert parse_score("[[7]]", r"\[\[(\d+)\]\]", 0, 10) == (7, None)
    assert parse_score("[[7]]", r"\[\[(\d+)\]\]", 0, 5) == (None, "score_out_of_range")


@pytest.mark.parametrize(
    "raw, clean",
    [
        ('"What limits the speed of nerve conduction?"', "What limits the speed of nerve conduction?"),
        ("```\nWrite a function that merges k sorted lists.\n```", "Write a function that merges k sorted lists."),
        ("```text\nA fenced query\n```", "A fenced query"),
        ('  "```\nquoted and fenced\n```"  ', "quoted and fenced"),
        ("\u201cCurly quotes\u201d", "Curly quotes"),
        ('He said "inner quotes" stay', 'He said "inner quotes" stay'),
        ("<think>plan the post</think>\nThe actual post", "The actual post"),
        ("plain", "plain"),
    ],
)
def test_clean_query(raw, clean):
    assert clean_query(raw) == clean


def test_parse_query_and_yes_no():
    assert parse_query('""') == (None, "empty_output")
    assert parse_query("  ") == (None, "empty_output")
    assert parse_yes_no("Yes") == (True, None)
    assert parse_yes_no(" no.") == (False, None)
    assert parse_yes_no("YES, it is about biology") == (True, None)
    assert parse_yes_no("Maybe") == (None, "not_yes_no")
    assert parse_yes_no("") == (None, "empty_output")


# ---- prompts and profiles ------------------------------------------------------------------------------------------
def test_prompts_carry_rules_and_texts():
    p = profile_for("biology")
    doc = "Photosynthesis uses {braces} and \u00e9 characters."
    g = generation_prompt(p, doc, "200 to 300 words", "college", "English")
    assert doc in g and "<<<BEGIN CONTENT>>>" in g and "<<<END CONTENT>>>" in g
    assert "about 200 to 300 words" in g and "college level education" in g
    assert "StackExchange post" in g and "self-contained" in g and '"the passage"' in g
    a = annotation_prompt(p, "Why do leaves change colour?", doc)
    assert p.relevance_definition in a and "<score>" in a and doc in a and "1 to 5" in a
    for step in ("Query analysis", "Document analysis", "Relevance judgement"):
        assert step in a
    r = reasoning_prompt(p, "Why do leaves change colour?")
    assert "Why do leaves change colour?" in r and p.query_type in r


def test_profiles_paper_group_settings_and_overrides():
    assert (profile_for("leetcode").train_group_size, profile_for("leetcode").batch_size) == (2, 64)
    assert (profile_for("pony").train_group_size, profile_for("pony").batch_size) == (64, 2)
    for d in ("biology", "aops", "theoremqa_theorems", "stackoverflow"):
        assert (profile_for(d).train_group_size, profile_for(d).batch_size) == (16, 8)
    assert profile_for("biology").retrieval_instruction.startswith("Given a Biology post")
    generic = profile_for("marine_biology")
    assert generic.label == "Marine Biology" and "Marine Biology" in generic.retrieval_instruction
    cfg = SynthesizeJobConfig.model_validate(
        {"data": {"domains": ["scifact"]}, "domain_profiles": {"scifact": {"doc_type": "abstract", "batch_size": 4}}}
    )
    p = profile_for("scifact", cfg.domain_profiles["scifact"])
    assert p.doc_type == "abstract" and p.batch_size == 4 and p.train_group_size == 16


# ---- ids and sampling ------------------------------------------------------------------------------------------------
def test_ids_are_content_hashes_and_shards_parse():
    assert content_hash("query", "bio", "q") == content_hash("query", "bio", "q")
    assert content_hash("query", "bio", "q") != content_hash("query", "bio", "q ")
    assert shard_domain(shard_name("earth-science_x", 12)) == "earth-science_x"


def test_length_and_level_draws_follow_paper_weights():
    cfg = SynthesizeJobConfig.model_validate({"data": {"domains": ["biology"]}})
    ctx = Context(cfg=cfg, run=None, profiles={"biology": profile_for("biology")})
    n = 6000
    src = pa.table({"domain": ["biology"] * n, "doc_id": [f"d{i}" for i in range(n)], "text": ["t"] * n,
                    "shard": ["biology-00000"] * n})
    req = generation_requests(ctx, src)
    again = generation_requests(ctx, src)
    assert req.equals(again)  # seeded per row: the same rows get the same draws
    lengths = Counter(req["length"].to_pylist())
    expected = {b.label: b.weight / 12 for b in cfg.generate.length_buckets}
    for label, share in expected.items():
        assert abs(lengths[label] / n - share) < 0.03, (label, lengths[label] / n, share)
    levels = Counter(req["education"].to_pylist())
    assert abs(levels["high school"] / n - 0.2) < 0.03 and abs(levels["PhD"] / n - 0.4) < 0.03


def test_unique_queries_keeps_smallest_gen_id():
    t = pa.table({"query_id": ["b", "a", "b", "c"], "gen_id": ["g9", "g1", "g2", "g3"], "x": [1, 2, 3, 4]})
    u, dropped = unique_queries(t)
    assert dropped == 1
    assert u["query_id"].to_pylist() == ["a", "b", "c"] and u["gen_id"].to_pylist() == ["g1", "g2", "g3"]


def _mine_cfg(**kw) -> MineConfig:
    return MineConfig(**{"search_top_k": 6, "keep": 4, **kw})


def test_select_candidates_removes_source_and_pads_deterministically():
    hits = [("src", 0.99), ("d1", 0.9), ("d2", 0.8)]
    pool = ["d1", "d2", "d3", "d4", "d5", "src"]
    ids, scores, n_pad = select_candidates(hits, "src", pool, _mine_cfg(), seed=42, query_id="q1")
    assert "src" not in ids and ids[:2] == ["d1", "d2"] and n_pad == 2 and len(set(ids)) == 4
    assert scores[:2] == [0.9, 0.8] and scores[2:] == [None, None]
    assert select_candidates(hits, "src", pool, _mine_cfg(), 42, "q1") == (ids, scores, n_pad)
    assert select_candidates(hits, "src", pool, _mine_cfg(pad_random=False), 42, "q1")[0] == ["d1", "d2"]
    assert format_query("Instruct: {task}\nQuery: {query}", "Find X.", "q") == "Instruct: Find X.\nQuery: q"
    assert format_query("Instruct: {task}\nQuery: {query}", None, "q") == "q"


def test_select_candidates_follows_the_reference_order():
    """Reference: the top `keep` hits, minus the source, refilled at random from the rest of the top search_top_k
    (not the next best hit); skip_source (the other order) takes the next best hit instead."""
    hits = [("d1", 0.9), ("src", 0.85), ("d2", 0.8), ("d3", 0.7), ("d4", 0.6), ("d5", 0.5), ("d6", 0.4)]
    pool = [d for d, _ in hits] + ["p1", "p2"]
    assert MineConfig().selection == "reference"
    drawn = set()
    for q in range(20):
        ids, scores, n_pad = select_candidates(hits, "src", pool, _mine_cfg(), seed=42, query_id=f"q{q}")
        assert ids[:3] == ["d1", "d2", "d3"] and n_pad == 1 and ids[3] in {"d4", "d5"}  # d6 is past search_top_k
        assert scores[3] == dict(hits)[ids[3]]  # a retrieved hit keeps its score
        drawn.add(ids[3])
    assert drawn == {"d4", "d5"}, "the refill is a seeded random draw from the rest, not the next best hit"
    ids, _, n_pad = select_candidates(hits, "src", pool, _mine_cfg(selection="skip_source"), 42, "q0")
    assert ids == ["d1", "d2", "d3", "d4"] and n_pad == 0
    # the source below the top `keep`: nothing to refill, the top `keep` hits are the candidates
    low = [("d1", 0.9), ("d2", 0.8), ("d3", 0.7), ("d4", 0.6), ("src", 0.5)]
    assert select_candidates(low, "src", pool, _mine_cfg(), 42, "q0")[:3:2] == (["d1", "d2", "d3", "d4"], 0)


def test_build_sample_splits_by_threshold():
    cfg = SynthesizeJobConfig.model_validate({"data": {"domains": ["leetcode"]}})
    ctx = Context(cfg=cfg, run=None, profiles={"leetcode": profile_for("leetcode")})
    q = {"query_id": "q1", "query": "Q", "reasoning_query": "R", "source_doc_id": "s", "domain": "leetcode",
         "shard": "leetcode-00000"}
    texts = {f"d{i}": f"text {i}" for i in range(6)}
    counts: Counter = Counter()
    s = format_stage.build_sample(q, [f"d{i}" for i in range(6)], {"d0": 5, "d1": 1, "d2": 3, "d3": 2, "d5": 4},
                                  texts, ctx, counts)
    assert s["pos_ids"] == ["d0", "d2", "d5"] and s["pos_scores"] == [5, 3, 4]
    assert s["neg_ids"] == ["d1", "d3"] and s["neg"] == ["text 1", "text 3"]
    assert (s["train_group_size"], s["batch_size"], s["n_unscored"]) == (2, 64, 1)
    assert s["prompt"] == profile_for("leetcode").retrieval_instruction and s["sample_id"] == content_hash("sample", "q1")
    assert format_stage.build_sample(q, ["d0"], {"d0": 4}, texts, ctx, counts) is None
    assert format_stage.build_sample(q, ["d1"], {"d1": 1}, texts, ctx, counts) is None
    assert counts["dropped_no_neg"] == 1 and counts["dropped_no_pos"] == 1


# ---- config -------------------------------------------------------------------------------------------------------
def test_presets_validate_and_flags_resolve():
    for preset in ("local-tiny", "paper-qwen3-8b"):
        path = REPO / "configs" / "synthesize" / f"{preset}.yaml"
        header = path.read_text().splitlines()[0]
        assert header.startswith("# ray job submit --working-dir . -- python jobs/synthesize.py --config "
                                 f"configs/synthesize/{preset}.yaml")
        cfg = load_model(SynthesizeJobConfig, path)
        for dotted in SynthesizeJobConfig.FLAGS.values():
            node = cfg
            for part in dotted.split("."):
                node = getattr(node, part)
    paper = load_model(SynthesizeJobConfig, REPO / "configs/synthesize/paper-qwen3-8b.yaml")
    assert paper.generator.sampling.temperature == 1.0 and paper.generator.sampling.top_p == 0.6
    assert (paper.annotator.sampling.temperature, paper.annotator.sampling.top_p,
            paper.annotator.sampling.top_k) == (0.7, 0.95, 40)
    assert paper.prepare.n_per_domain == 10_000 and paper.mine.search_top_k == 1000 and paper.mine.keep == 100
    assert paper.annotator.structured_output is None  # the paper's path: free text + strict parse


def test_defaults_are_the_papers():
    c = SynthesizeJobConfig()
    assert (c.prepare.min_chars, c.prepare.max_chars, c.prepare.n_per_domain, c.seed) == (200, 5000, 10_000, 42)
    assert [b.weight for b in c.generate.length_buckets] == [1, 2, 3, 3, 2, 1]
    assert [b.weight for b in c.generate.education_levels] == [1, 2, 2]
    assert (c.format.pos_min_score, c.format.neg_max_score) == (3, 2)
    assert c.annotator.chat_template_kwargs == {"enable_thinking": False}
    assert c.annotator.sampling.max_tokens == 2048 and c.mine.embedder.max_length == 8192
    assert c.mine.selection == "reference" and (c.mine.search_top_k, c.mine.keep) == (1000, 100)


def _fields(model) -> list:
    out = []
    for name, f in model.model_fields.items():
        out.append((f"{model.__name__}.{name}", f.description))
        ann = f.annotation
        for sub in getattr(ann, "__args__", ()) + (ann,):
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                out += _fields(sub)
    return out


def test_every_field_has_a_description():
    missing = [n for n, d in _fields(SynthesizeJobConfig) if not d]
    assert not missing, missing


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["mine.keep=200"], "keep (200) > search_top_k"),
        (["prepare.min_chars=6000"], "min_chars (6000) > max_chars"),
        (["prepare.typo=1"], "prepare.typo: unknown key"),
        (["data.domains=[bad/name]"], "use letters"),
        (["domain_profiles={nope: {label: X}}"], "not in data.domains"),
        (["format.pos_min_score=2"], "neg_max_score (2) must be < pos_min_score (2)"),
        (["annotate.score_pattern=<score>"], "capture group"),
        (["annotate.max_score=3", "format.pos_min_score=4", "format.neg_max_score=2"], "annotate.max_score"),
        (["generator.concurrency=[3, 1]"], "concurrency"),
    ],
)
def test_config_errors_name_the_field(overrides, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_model(SynthesizeJobConfig, REPO / "configs/synthesize/local-tiny.yaml", overrides)
    assert needle in str(err.value)


# ---- stage 0 on real files -------------------------------------------------------------------------------------------
def _bright_gold(data_dir: Path, task: str, n: int) -> list[str]:
    gold = []
    for line in (data_dir / "bright" / task / "queries.jsonl").read_text().splitlines():
        gold += json.loads(line)["gold_ids"]
    return sorted(set(gold))[:n]


@pytest.fixture
def mixed_corpus(tmp_path, scifact_dir, data_dir) -> tuple[Path, list[str]]:
    """SciFact texts under BRIGHT biology gold ids (must never be sources) and ordinary ids, plus bad records."""
    docs = [json.loads(x) for x in (scifact_dir / "corpus.jsonl").read_text().splitlines()[:40]]
    docs = [d for d in docs if 200 <= len(d["text"]) <= 5000]
    gold = _bright_gold(data_dir, "biology", 10)
    lines = []
    for i, d in enumerate(docs[:30]):
        doc_id = gold[i] if i < len(gold) else f"sf-{d['id']}"
        lines.append(json.dumps({"id": doc_id, "text": d["text"]}))
    lines.append(json.dumps({"id": "zz-duplicate", "text": docs[len(gold)]["text"]}))
    lines.append(json.dumps({"id": "short", "text": "too short"}))
    lines.append(json.dumps({"id": "long", "text": "x" * 6000}))
    lines.append("{not json")
    lines.append(json.dumps({"text": "no id here " * 30}))
    lines.append(json.dumps({"id": "num", "text": 42}))
    folder = tmp_path / "bio"
    folder.mkdir()
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return folder, gold


def _prep_cfg(corpus: Path, out: Path, data_dir: Path, **extra) -> SynthesizeJobConfig:
    raw = {"out": str(out), "data": {"corpus": str(corpus), "domains": ["biology"],
                                     "decontamination": {"benchmark": "bright", "path": str(data_dir / "bright"),
                                                         "tasks": ["biology"]}},
           "prepare": {"n_per_domain": 100, "rows_per_shard": 4}}
    for k, v in extra.items():
        raw.setdefault(k, {}).update(v)
    return SynthesizeJobConfig.model_validate(raw)


def _run_prepare(ctx: Context, h: str) -> dict:
    """Stage 0 alone under config hash ``h``, as the pipeline runs it; returns its manifest fields."""
    ctx.hashes["prepare"] = h
    return prepare.PREPARE.run(ctx).manifest_fields()


def test_prepare_decontaminates_dedups_and_keeps_bad_rows(mixed_corpus, tmp_path, data_dir):
    corpus, gold = mixed_corpus
    cfg = _prep_cfg(corpus, tmp_path / "runs", data_dir)
    ctx = Context.open(cfg)
    fields = _run_prepare(ctx, "h1")
    sources = ctx.stage("prepare").read_parts()
    pool = ctx.stage("pool").read_parts()
    src_ids = set(sources["doc_id"].to_pylist())
    assert not src_ids & set(gold), "a BRIGHT gold document became a source"
    assert not set(pool["doc_id"].to_pylist()) & set(gold), "a BRIGHT gold document is in the mining pool"
    assert len(gold) == 10 and fields["extra"]["contaminated"] == 10
    assert fields["extra"]["gold_ids"] > 100  # every gold id of every biology query
    assert fields["extra"]["duplicates"] == 1 and "zz-duplicate" not in src_ids
    assert fields["extra"]["too_short"] == 1 and fields["extra"]["too_long"] == 1
    assert "short" not in src_ids and "long" not in src_ids
    assert fields["rows_out"] == len(src_ids) == 20
    errors = ctx.stage("prepare").read_errors()
    assert Counter(errors["reason"].to_pylist()) == {"malformed_json": 1, "missing_id": 1, "non_text": 1}
    assert fields["errors_by_reason"] == {"malformed_json": 1, "missing_id": 1, "non_text": 1}
    assert all(len(t) >= 200 for t in sources["text"].to_pylist())
    # shards: fixed-size chunks of the doc-id-sorted sample
    assert sorted(ctx.stage("prepare").done_shards()) == [f"biology-{k:05d}" for k in range(5)]
    assert sources["doc_id"].to_pylist() == sorted(src_ids)


def test_prepare_gold_copy_under_another_id_is_decontaminated(mixed_corpus, tmp_path, data_dir):
    """Dedup keeps the smallest id of identical texts; a non-gold copy of a gold text (a smaller id) must not
    survive it as a source or in the mining pool: gold is checked by text as well as by id."""
    corpus, gold = mixed_corpus
    lines = (corpus / "corpus.jsonl").read_text().splitlines()
    gold_doc = next(json.loads(x) for x in lines if x.startswith("{") and json.loads(x).get("id") == gold[0])
    copy_id = "0000-copy-of-gold"
    assert copy_id < gold[0]
    lines.append(json.dumps({"id": copy_id, "text": gold_doc["text"]}))
    (corpus / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    ctx = Context.open(_prep_cfg(corpus, tmp_path / "runs", data_dir))
    fields = _run_prepare(ctx, "h-gold-copy")
    sources = set(ctx.stage("prepare").read_parts()["doc_id"].to_pylist())
    pool = set(ctx.stage("pool").read_parts()["doc_id"].to_pylist())
    assert copy_id not in sources, "a copy of a gold document became a source"
    assert copy_id not in pool and gold[0] not in pool, "a copy of a gold document is in the mining pool"
    assert fields["extra"]["contaminated_by_text"] == 1 and fields["extra"]["contaminated"] == 11


def test_prepare_sampling_is_seeded(mixed_corpus, tmp_path, data_dir):
    corpus, _ = mixed_corpus

    def sample(out: str, seed: int) -> list[str]:
        cfg = _prep_cfg(corpus, tmp_path / out, data_dir, prepare={"n_per_domain": 7, "sample_seed": seed})
        ctx = Context.open(cfg)
        _run_prepare(ctx, "h")
        return ctx.stage("prepare").read_parts()["doc_id"].to_pylist()

    a, b, c = sample("a", 1), sample("b", 1), sample("c", 2)
    assert a == b and len(a) == 7 and a != c


def test_decontamination_path_must_exist(mixed_corpus, tmp_path, data_dir):
    corpus, _ = mixed_corpus
    cfg = _prep_cfg(corpus, tmp_path / "r", data_dir)
    cfg.data.decontamination.path = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="decontamination.path"):
        _run_prepare(Context.open(cfg), "h")


# ---- the stage protocol ---------------------------------------------------------------------------------------
def test_pipeline_loops_over_stages_with_one_protocol():
    """Every stage has a name, a fingerprint (config hash chained through the stages before it, plus inputs) and a
    run returning a StageResult; a changed generator setting changes generate's hash and every later stage's."""
    import inspect

    from reasonembed.remixer import context, pipeline
    from reasonembed.remixer.prompts import profiles
    from reasonembed.remixer.stage import Stage, StageResult

    assert tuple(s.name for s in pipeline.STAGES) == context.STAGES
    for stage in pipeline.STAGES:
        assert isinstance(stage, Stage) and list(inspect.signature(stage.run).parameters) == ["ctx"]
        assert inspect.signature(stage.run).return_annotation in (StageResult, "StageResult")
        assert set(stage.upstream) <= {*context.STAGES, "pool"} and set(stage.requires) <= {*stage.upstream}

    def hashes(*overrides: str) -> dict[str, str]:
        cfg = load_model(SynthesizeJobConfig, REPO / "configs" / "synthesize" / "local-tiny.yaml", list(overrides))
        ctx = Context(cfg=cfg, run=None, profiles=profiles(cfg))
        for stage in (s for s in pipeline.STAGES if s.enabled(ctx)):
            ctx.hashes[stage.name] = stage.config_hash(ctx)
        return ctx.hashes

    base, hot = hashes(), hashes("generator.sampling.temperature=0.5")
    assert [n for n in base if base[n] != hot[n]] == ["generate", "reason", "mine", "annotate", "format"]
    no_reason = hashes("reasoning.enabled=false")
    assert "reason" not in no_reason and no_reason["prepare"] == base["prepare"] and no_reason["mine"] != base["mine"]
    result = StageResult(rows_in=3, rows_out=2, rows_error=1, errors_by_reason={"x": 1}, extra={"k": 1},
                         shards_changed=["s"])
    assert result.manifest_fields() == {"rows_in": 3, "rows_out": 2, "rows_error": 1, "errors_by_reason": {"x": 1},
                                        "extra": {"k": 1}}


# ---- engine settings for exact re-generation -------------------------------------------------------------------
def test_batch_invariant_engine_settings():
    from reasonembed.config.llm import LLMEngineConfig
    from reasonembed.llm.engine_args import engine_kwargs
    from reasonembed.remixer.llm_stage import batch_invariant_engine

    cpu = LLMEngineConfig(model="tiny-qwen3", max_model_len=4096, sampling={"max_tokens": 8, "seed": 0})
    inv = batch_invariant_engine(cpu)
    # the stage adds only its own keys; the engine builder adds the step budget whole-prompt prefill needs
    assert inv.engine_kwargs == {"max_num_seqs": 1, "enable_prefix_caching": False, "enable_chunked_prefill": False}
    built = engine_kwargs(inv)
    assert {k: built[k] for k in ("max_num_seqs", "enable_prefix_caching", "enable_chunked_prefill",
                                  "max_num_batched_tokens")} == {
        "max_num_seqs": 1, "enable_prefix_caching": False, "enable_chunked_prefill": False,
        "max_num_batched_tokens": 4096}
    user = cpu.model_copy(update={"engine_kwargs": {"max_num_seqs": 4}})
    assert engine_kwargs(batch_invariant_engine(user))["max_num_seqs"] == 4  # the user's keys win
    seeded = engine_kwargs(cpu)
    assert (seeded["enable_chunked_prefill"], seeded["max_num_batched_tokens"]) == (False, 4096)
    unseeded = cpu.model_copy(update={"sampling": cpu.sampling.model_copy(update={"seed": None})})
    assert "enable_chunked_prefill" not in engine_kwargs(unseeded) and "max_num_batched_tokens" not in \
        engine_kwargs(unseeded)
    gpu = LLMEngineConfig(model="org/m", num_gpus=1, sampling={"max_tokens": 8})
    g = batch_invariant_engine(gpu)
    assert g.runtime_env["env_vars"]["VLLM_BATCH_INVARIANT"] == "1" and g.engine_kwargs == {}
    assert "enable_chunked_prefill" not in engine_kwargs(g)  # GPU generators support chunked prefill with seeds


@pytest.mark.parametrize("max_model_len", [512, 2048, 8192])
@pytest.mark.parametrize("seed", [0, None])
def test_direct_generate_and_synthesis_stage_build_the_same_engine_kwargs(max_model_len, seed):
    """One engine builder: a synthesis stage's engine arguments are a direct generate()'s plus only the stage's own
    keys (batch-invariant mode), with the same CPU step budget (it used to get 2048 where generate() got 4096)."""
    from reasonembed.config.llm import LLMEngineConfig
    from reasonembed.llm.engine_args import CPU_WHOLE_PREFILL_TOKENS, to_processor_config
    from reasonembed.remixer.llm_stage import stage_engine

    cfg = LLMEngineConfig(model="org/m", max_model_len=max_model_len, sampling={"max_tokens": 8, "seed": seed})
    direct = to_processor_config(cfg, model_source="org/m").engine_kwargs  # what generate() hands Ray
    assert to_processor_config(stage_engine(cfg, False), model_source="org/m").engine_kwargs == direct
    invariant = to_processor_config(stage_engine(cfg, True), model_source="org/m").engine_kwargs
    budget = max(max_model_len, CPU_WHOLE_PREFILL_TOKENS)
    whole_prefill = {"enable_chunked_prefill": False, "max_num_batched_tokens": budget}
    assert invariant == {**direct, **whole_prefill, "max_num_seqs": 1, "enable_prefix_caching": False}
    if seed is not None:
        assert {k: direct[k] for k in whole_prefill} == whole_prefill


def test_prepare_reads_and_writes_s3(mixed_corpus, s3_server, data_dir):
    """Corpus on S3 and run folder on S3 (moto's real S3 server): same sources as locally."""
    import boto3

    corpus, gold = mixed_corpus
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.put_object(Bucket="reasonembed", Key="corpora/bio/corpus.jsonl", Body=(corpus / "corpus.jsonl").read_bytes())
    cfg = _prep_cfg(corpus, Path("unused"), data_dir)
    cfg = cfg.model_copy(update={"out": "s3://reasonembed/runs",
                                 "data": cfg.data.model_copy(update={"corpus": "s3://reasonembed/corpora/bio"})})
    ctx = Context.open(cfg)
    fields = _run_prepare(ctx, "h-s3")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="reasonembed", Prefix="runs/")["Contents"]}
    assert "runs/local-tiny/synthesize/prepare/part-biology-00000.parquet" in keys
    assert "runs/local-tiny/synthesize/pool/part-biology.parquet" in keys
    sources = ctx.stage("prepare").read_parts()["doc_id"].to_pylist()
    assert len(sources) == fields["rows_out"] == 20 and not set(sources) & set(gold)


def test_query_cleaning_unwraps_json_and_strips_lead_in_labels():
    from reasonembed.remixer.parsing import strip_lead_in, unwrap_json

    labels = ("scientific claim", "scientific claim")
    assert unwrap_json('{"claim": "Vitamin D lowers fracture risk."}') == "Vitamin D lowers fracture risk."
    assert unwrap_json('{"a": "x", "b": "y"}') == '{"a": "x", "b": "y"}'  # two strings: not a one-field wrapper
    assert unwrap_json("{not json}") == "{not json}"
    assert strip_lead_in("The claim that statins lower LDL.", labels) == "Statins lower LDL."
    assert strip_lead_in('The scientific claim is: "Statins lower LDL." The study shows', labels) == "Statins lower LDL."
    assert strip_lead_in('Claim: "Statins lower LDL in adults', labels) == "Statins lower LDL in adults"
    assert strip_lead_in("The claims of statins are many.", labels) == "The claims of statins are many."
    assert strip_lead_in("Statins lower LDL.", ()) == "Statins lower LDL."
    assert parse_query('"Claim: statins lower LDL."', labels) == ("Statins lower LDL.", None)
    assert parse_query("Claim:", labels) == ("Claim:", None)  # nothing after the label: keep the text as written
