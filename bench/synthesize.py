"""Synthesis benchmark: the generate stage through Ray Data + vLLM vs raw ``vllm.LLM.generate``, then the whole
tiny pipeline's rows/s per stage.

    python bench/synthesize.py                         # 96 SciFact generation prompts, tiny Qwen3, 64 new tokens
    python bench/synthesize.py --prompts 256 --max-tokens 128 --skip-pipeline

Part 1 renders the *same* token ids for both paths (``reasonembed.llm.RequestBuilder``: chat template, per-row
seeds), runs them through raw ``vllm.LLM.generate`` (engine already loaded) and through
``reasonembed.llm.generate`` on a local Ray cluster (the path the generate stage uses), and prints generated
tokens/s of each and their ratio (goal >= 0.9), in both engine modes (``--mode``): vLLM's continuous batching,
and the batch-invariant mode the stages use by default (on CPU: one sequence per engine step). Ray's figure is measured two ways: *steady* (from the first
output batch to the last, i.e. without the engine start-up, which the raw path also excludes) and *total*
(including actor and engine start-up). Sampling is seeded per row; in invariant mode both paths must produce
identical texts (the benchmark counts them). In batched mode they may differ: Ray's streaming feeds the engine
asynchronously, so decode steps get batched with other requests' prefills and round differently.

Part 2 runs ``configs/synthesize/local-tiny.yaml`` end to end (fresh run folder) and prints rows/s per stage from
the stage manifests. Engine start-up dominates at this size (tens of seconds per LLM stage on CPU).

Both parts share one machine; the raw engine is shut down before Ray starts, so they never compete for cores.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
               "VLLM_CPU_KVCACHE_SPACE": "1"}.items():
    os.environ.setdefault(_k, _v)


def build_rows(n: int, data_dir: Path, seed: int) -> list[dict]:
    """n generation requests over SciFact documents, exactly as the generate stage builds them."""
    import pyarrow as pa

    from reasonembed.config.synthesize import SynthesizeJobConfig
    from reasonembed.remixer.context import Context
    from reasonembed.remixer.generate import generation_requests
    from reasonembed.remixer.prompts import profile_for

    docs = [json.loads(x) for x in (data_dir / "beir" / "scifact" / "corpus.jsonl").read_text().splitlines()[:n]]
    cfg = SynthesizeJobConfig.model_validate({"seed": seed, "data": {"domains": ["scifact"]}})
    ctx = Context(cfg=cfg, run=None, profiles={"scifact": profile_for("scifact")})
    src = pa.table({"domain": ["scifact"] * len(docs), "doc_id": [d["id"] for d in docs],
                    "text": [d["text"][:3000] for d in docs], "shard": ["scifact-00000"] * len(docs)})
    return generation_requests(ctx, src).to_pylist()


def engine_config(max_tokens: int, batch_size: int, invariant: bool):
    from reasonembed.config.llm import LLMEngineConfig
    from reasonembed.remixer.llm_stage import batch_invariant_engine

    cfg = LLMEngineConfig(model="tiny-qwen3", max_model_len=4096, batch_size=batch_size, max_concurrent_batches=2,
                          sampling={"temperature": 1.0, "top_p": 0.6, "max_tokens": max_tokens,
                                    "min_tokens": max_tokens, "seed": 0})
    # The stage's own engine settings (run_llm_shards): in invariant mode one sequence per engine step. (No chunked
    # prefill with seeds on CPU is applied to every engine by reasonembed.llm.engine_args.engine_kwargs.)
    return batch_invariant_engine(cfg) if invariant else cfg


def run_raw(rows: list[dict], cfg) -> dict:
    """Raw vLLM: same token ids and sampling params, engine loaded before the clock starts."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from reasonembed.llm import RequestBuilder
    from reasonembed.llm.engine_args import engine_kwargs, resolve_model_source
    from reasonembed.remixer.generate import GenerationMessages
    from reasonembed.remixer.prompts import profile_for

    builder = RequestBuilder(cfg, GenerationMessages({"scifact": profile_for("scifact")}, "English"), "gen_id")
    reqs = [builder(r) for r in rows]
    t0 = time.time()
    llm = LLM(model=resolve_model_source(cfg.model), **engine_kwargs(cfg))
    load_s = time.time() - t0
    prompts = [TokensPrompt(prompt_token_ids=q["tokenized_prompt"]) for q in reqs]
    params = [SamplingParams(**q["sampling_params"]) for q in reqs]
    t0 = time.time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    gen_s = time.time() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    texts = {r["gen_id"]: o.outputs[0].text for r, o in zip(rows, outs, strict=True)}
    del llm, outs  # frees the engine process before Ray starts
    import gc

    gc.collect()
    return {"load_s": round(load_s, 2), "generate_s": round(gen_s, 3), "tokens": tokens,
            "tokens_per_s": round(tokens / gen_s, 1), "texts": texts}


def run_ray(rows: list[dict], cfg) -> dict:
    """The generate stage's path: ``reasonembed.llm.generate`` (Ray Data + vLLM actor), streamed to the driver."""
    import ray

    from reasonembed.llm import generate
    from reasonembed.remixer.generate import GenerationMessages
    from reasonembed.remixer.prompts import profile_for

    ray.init(address="local", num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False,
             log_to_driver=False, _node_ip_address="127.0.0.1")
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        ds = ray.data.from_items(rows)
        t0 = time.time()
        out = generate(ds, cfg, GenerationMessages({"scifact": profile_for("scifact")}, "English"), id_column="gen_id",
                       keep_columns=["gen_id"])
        arrivals, texts, tokens = [], {}, 0
        for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
            n = int(sum(batch["num_generated_tokens"].to_pylist()))
            arrivals.append((time.time(), n))
            tokens += n
            texts.update(zip(batch["gen_id"].to_pylist(), batch["generated_text"].to_pylist(), strict=True))
        total_s = time.time() - t0
    finally:
        ray.shutdown()
    steady = None
    if len(arrivals) > 1:
        span = arrivals[-1][0] - arrivals[0][0]
        steady = round(sum(n for _, n in arrivals[1:]) / span, 1) if span > 0 else None
    return {"total_s": round(total_s, 2), "tokens": tokens, "batches": len(arrivals),
            "tokens_per_s_total": round(tokens / total_s, 1), "tokens_per_s_steady": steady, "texts": texts}


def run_pipeline(data_dir: Path) -> dict:
    """local-tiny end to end in a fresh folder; rows/s per stage from the manifests."""
    from reasonembed.config.base import load_model
    from reasonembed.config.synthesize import SynthesizeJobConfig
    from reasonembed.remixer import pipeline

    with tempfile.TemporaryDirectory() as out:
        cfg = load_model(SynthesizeJobConfig, REPO / "configs/synthesize/local-tiny.yaml",
                         [f"out={out}", f"data.corpus={data_dir / 'beir' / 'scifact'}"])
        t0 = time.time()
        summary = pipeline.run(cfg)
        wall = time.time() - t0
    stages = {}
    for name, s in summary["stages"].items():
        rate = s["rows_in"] / s["wall_s"] if s["wall_s"] else None
        stages[name] = {"rows_in": s["rows_in"], "rows_out": s["rows_out"], "rows_error": s["rows_error"],
                        "wall_s": s["wall_s"], "rows_per_s": round(rate, 3) if rate else None,
                        "tokens_per_s": s.get("tokens_per_s")}
    return {"wall_s": round(wall, 1), "stages": stages, "samples": summary["samples"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("REASONEMBED_DATA_DIR",
                                                                          REPO.parent / "shared" / "data")))
    ap.add_argument("--mode", choices=["batched", "invariant", "both"], default="both",
                    help="engine mode: batched (vLLM's continuous batching) or invariant (the stage default, "
                    "batch_invariant: true; on CPU one sequence per step)")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("REASONEMBED_DATA_DIR", str(args.data_dir))

    rows = build_rows(args.prompts, args.data_dir, args.seed)
    result: dict = {"prompts": len(rows), "max_tokens": args.max_tokens, "modes": {}}
    modes = ["batched", "invariant"] if args.mode == "both" else [args.mode]
    for mode in modes:
        cfg = engine_config(args.max_tokens, args.batch_size, invariant=mode == "invariant")
        raw = run_raw(rows, cfg)
        print(f"[{mode}] raw vllm.LLM.generate : {raw['tokens']} tokens in {raw['generate_s']} s = "
              f"{raw['tokens_per_s']} tok/s (engine load {raw['load_s']} s, not counted)")
        ray_res = run_ray(rows, cfg)
        print(f"[{mode}] Ray Data + vLLM actor : {ray_res['tokens']} tokens; steady {ray_res['tokens_per_s_steady']} "
              f"tok/s over {ray_res['batches']} output batches; total {ray_res['tokens_per_s_total']} tok/s in "
              f"{ray_res['total_s']} s (with actor and engine start-up)")
        same = sum(raw["texts"][k] == v for k, v in ray_res["texts"].items())
        ratio = (ray_res["tokens_per_s_steady"] or 0) / raw["tokens_per_s"] if raw["tokens_per_s"] else 0.0
        print(f"[{mode}] ratio (steady Ray / raw) = {ratio:.3f} (goal >= 0.9); identical texts: {same}/{len(rows)}")
        result["modes"][mode] = {"raw": {k: v for k, v in raw.items() if k != "texts"},
                                 "ray": {k: v for k, v in ray_res.items() if k != "texts"},
                                 "ratio_steady": round(ratio, 3), "identical_texts": same}
    if not args.skip_pipeline:
        pipe = run_pipeline(args.data_dir)
        result["pipeline"] = pipe
        print(f"local-tiny pipeline: {pipe['wall_s']} s wall, {pipe['samples']} samples")
        for name, s in pipe["stages"].items():
            print(f"  {name:>13}: {s['rows_in']:>5} rows in {s['wall_s']:>7.1f} s = {s['rows_per_s']} rows/s"
                  + (f", {s['tokens_per_s']} tok/s" if s.get("tokens_per_s") else ""))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
