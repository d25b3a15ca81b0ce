"""Redapter trainer without Ray: config, LR schedule, checkpoint fingerprints, and the per-worker loop run in-process
(``LocalSession``) on real ImpliRet text with the tiny Qwen3 (LoRA, last-token) and MiniLM (full fine-tuning).

The Ray Train runs (DDP and DeepSpeed with 2 workers, a killed worker, a re-submitted job) are in
tests/test_trainer_ray.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from reasonembed.config.base import ConfigError, StrictModel, load_model
from reasonembed.config.train import TrainJobConfig
from reasonembed.data.beir import load_beir_folder
from reasonembed.redapter.curves import read_events, read_rows
from reasonembed.redapter.data import read_training_data
from reasonembed.redapter.samples import GroupSizes, samples_from_task, write_jsonl
from reasonembed.redapter.session import LocalSession
from reasonembed.redapter.state import CheckpointMismatchError, check_compatible
from reasonembed.redapter.strategies import lr_lambda
from reasonembed.redapter.worker import WorkerArgs, format_queries, run_worker

PROMPT = "Given a forum question, retrieve the post that answers it"


def impliret_samples(data_dir: Path, out: Path, n: int = 16, n_neg: int = 3, group: int = 3, batch: int = 2) -> Path:
    """Release-format rows from ImpliRet wknow: the judged post is the positive, the posts of the following
    queries (same tuple set: same people and activities, other places) are hard negatives. Every fourth query has
    no reasoning query (trained with basic InfoNCE); the others get the question plus its answer."""
    folder = data_dir / "impliret" / "wknow-multispeaker"
    task = load_beir_folder(folder, benchmark="impliret")
    answers = {}
    for line in (folder / "queries.jsonl").read_text().splitlines():
        obj = json.loads(line)
        answers[obj["id"]] = obj["answer"]
    qids = task.queries.ids[:n]
    negatives = {q: [f"d{(int(q[1:]) + k) % len(task.corpus)}" for k in range(1, n_neg + 1)] for q in qids}
    texts = dict(zip(task.queries.ids, task.queries.texts, strict=True))
    reasoning = {q: f"{texts[q]} The answer is {answers[q]}." for q in qids if int(q[1:]) % 4}
    rows = samples_from_task(task, qids, negatives, prompt=PROMPT, sizes=GroupSizes(group, batch), reasoning=reasoning)
    return write_jsonl(rows, out / "impliret.jsonl").parent


def job(samples_dir: Path, out: Path | str, model: str = "tiny-qwen3", **over) -> TrainJobConfig:
    base = {
        "data": {"paths": str(samples_dir)}, "out": str(out), "embedder": {"model": model, "max_length": 32},
        "loss": {"ri_start_step": 1}, "optim": {"max_steps": 3}, "checkpointing": {"every_n_steps": 2},
    }
    for key, value in over.items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    return TrainJobConfig.model_validate(base)


def worker_args(cfg: TrainJobConfig, run_dir: Path) -> WorkerArgs:
    data = read_training_data(cfg.data)
    return WorkerArgs(job=cfg, table=data.table, run_uri=str(run_dir / "train"), export_uri=str(run_dir / "model"),
                      prompts={"query": f"Instruct: {PROMPT}\nQuery: ", "document": ""}, instruction=PROMPT, threads=1)


# -- config ------------------------------------------------------------------------------------------------------


def _walk(model: type[StrictModel], seen: set) -> None:
    if model in seen:
        return
    seen.add(model)
    for name, f in model.model_fields.items():
        assert f.description, f"{model.__name__}.{name} has no description"
        ann = f.annotation
        for sub in getattr(ann, "__args__", ()) + (ann,):
            if isinstance(sub, type) and issubclass(sub, StrictModel):
                _walk(sub, seen)


def test_config_defaults_flags_and_errors(tmp_path):
    cfg = TrainJobConfig.model_validate({"data": {"paths": "samples/"}})
    assert cfg.data.paths == ["samples/"]  # --data gives one string
    assert TrainJobConfig.FLAGS == {"model": "embedder.model", "data": "data.paths", "out": "out"}
    assert cfg.embedder.max_length == 512 and cfg.lora.enabled is None
    assert (cfg.lora.r, cfg.lora.alpha) == (32, 64)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.epochs, cfg.zero_stage) == (1e-4, 0.1, 1, 1)
    assert (cfg.loss.temperature, cfg.loss.kappa, cfg.loss.ri_start_step) == (0.02, 5.0, 100)
    _walk(TrainJobConfig, set())
    with pytest.raises(ConfigError, match="optim.warmup_ratoi: unknown key"):
        load_model(TrainJobConfig, overrides=["data.paths=x", "optim.warmup_ratoi=0.2"])
    with pytest.raises(ConfigError, match="zero_stage"):
        load_model(TrainJobConfig, overrides=["data.paths=x", "zero_stage=3"])
    with pytest.raises(ConfigError, match="query_format must end with"):
        load_model(TrainJobConfig, overrides=["data.paths=x", "embedder.query_format='{query} ({task})'"])
    with pytest.raises(ConfigError, match="data"):
        load_model(TrainJobConfig, overrides=[])
    for preset in ("local-tiny", "paper-qwen3-8b"):
        path = Path(__file__).resolve().parents[1] / "configs" / "train" / f"{preset}.yaml"
        head = path.read_text().splitlines()[0]
        assert head.startswith("# ray job submit --working-dir . -- python jobs/train.py --config "
                               f"configs/train/{preset}.yaml")
        load_model(TrainJobConfig, path)
    paper = load_model(TrainJobConfig, path)
    assert paper.strategy == "deepspeed" and paper.scaling.num_workers == 8 and paper.scaling.use_gpu


def test_lr_schedule_warmup_then_linear_decay():
    fn = lr_lambda(total_steps=20, warmup_ratio=0.1, schedule="linear")  # W = 2
    assert [fn(s) for s in range(4)] == [0.0, 0.5, 1.0, pytest.approx(17 / 18)]
    assert fn(19) == pytest.approx(1 / 18) and fn(20) == 0.0
    const = lr_lambda(10, 0.0, "constant")
    assert all(const(s) == 1.0 for s in range(10))


def test_query_format_per_row():
    fmt = "Instruct: {task}\nQuery: {query}"
    assert format_queries(["q1", "q2"], ["find it", ""], fmt) == ["Instruct: find it\nQuery: q1", "q2"]


def test_fingerprint_mismatch_names_every_field():
    saved = {"lora.r": 32, "optim.lr": 1e-4, "world_size": 2, "optim.betas": [0.9, 0.999]}
    check_compatible(saved, {**saved, "optim.betas": (0.9, 0.999)}, "ckpt")  # tuples and lists compare equal
    with pytest.raises(CheckpointMismatchError) as err:
        check_compatible(saved, {**saved, "lora.r": 8, "world_size": 4}, "runs/x/checkpoint-00000004")
    msg = str(err.value)
    assert "lora.r: checkpoint 32 != config 8" in msg and "world_size: checkpoint 2 != config 4" in msg
    assert "optim.lr" not in msg and "checkpoint-00000004" in msg


def test_worker_args_are_frozen_and_picklable(tmp_path):
    """Ray Train pickles the driver's WorkerArgs to every worker; a mapping of the same fields converts to it."""
    import dataclasses
    import pickle

    cfg = job(tmp_path, tmp_path / "runs")
    args = WorkerArgs(job=cfg, table=None, run_uri=str(tmp_path / "train"), export_uri=str(tmp_path / "model"),
                      prompts={"query": "", "document": ""}, resume_from=str(tmp_path / "ckpt"),
                      fault={"step": 3, "rank": 1, "marker": str(tmp_path / "killed")})
    assert pickle.loads(pickle.dumps(args)) == args
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.run_uri = "elsewhere"
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    assert WorkerArgs.coerce({**fields, "job": cfg.model_dump(mode="json")}) == args
    assert WorkerArgs.coerce(args) is args


# -- the worker loop in-process ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples(data_dir, tmp_path_factory) -> Path:
    return impliret_samples(data_dir, tmp_path_factory.mktemp("samples"))


def test_local_loop_lora_checkpoint_resume_and_mismatch(samples, tmp_path, tiny_qwen3_path):
    cfg = job(samples, tmp_path, data={"train_group_size": 5})  # 4 negatives needed, 3 available: repeated
    session = LocalSession(tmp_path / "ckpt")
    first = run_worker(worker_args(cfg, tmp_path), session)
    assert first["state"].global_step == 3 and not first["resumed"]
    assert first["model"]["lora"] and first["model"]["kind"] == "decoder"
    assert first["model"]["trainable_params"] < first["model"]["total_params"] / 4
    # checkpoints at step 2 (every 2) and 3 (the last step)
    assert [p.name for p in session.checkpoints()] == ["checkpoint-00000002", "checkpoint-00000003"]
    rows = read_rows(str(tmp_path / "train"))
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["ri_active"] is False and rows[0]["ri_mean"] is None  # step 0 < ri_start_step: plain InfoNCE
    assert all(r["ri_active"] for r in rows[1:])  # ri_start_step = 1
    assert all(r["ri_min"] <= r["ri_median"] <= r["ri_max"] for r in rows[1:])
    assert all(math.isfinite(r["loss"]) and r["lr"] >= 0 and r["samples_per_s"] > 0 for r in rows)
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(1e-4)  # warmup of 1 step, then decay
    assert sum(r["n_without_reasoning"] for r in rows) > 0  # rows without reasoning_query are counted
    assert all(r["truncated"] > 0 for r in rows)  # ImpliRet posts are longer than 32 tokens: cut and counted
    assert all(r["repeated_groups"] == 2 and r["passages"] == 10 for r in rows)  # 2 queries x group 5

    # The same job again with more steps continues at step 3 from the newest checkpoint, not from zero.
    longer = job(samples, tmp_path, data={"train_group_size": 5}, optim={"max_steps": 5})
    second = run_worker(worker_args(longer, tmp_path), session)
    assert second["resumed"] and second["state"].global_step == 5 and second["state"].attempt == 2
    rows = read_rows(str(tmp_path / "train"))
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and [r["attempt"] for r in rows] == [1, 1, 1, 2, 2]
    events = read_events(str(tmp_path / "train"))
    assert [(e["event"], e["step"]) for e in events] == [("start", 0), ("finish", 3), ("resume", 3), ("finish", 5)]

    # The exported folder holds merged weights (no peft) that differ from the base model.
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    base = load_file(str(tiny_qwen3_path / "model.safetensors"))
    key = "layers.0.self_attn.q_proj.weight"
    assert not any("lora" in k for k in exported)
    assert not torch.equal(exported[key], base[f"model.{key}"])

    # A different recipe refuses to resume and names the setting.
    with pytest.raises(CheckpointMismatchError, match=r"lora\.r: checkpoint 32 != config 8"):
        run_worker(worker_args(job(samples, tmp_path, data={"train_group_size": 5}, lora={"r": 8},
                                   optim={"max_steps": 6}), tmp_path), session)


def test_local_loop_minilm_full_finetune_with_accumulation(samples, tmp_path, minilm_path):
    cfg = job(samples, tmp_path, model="minilm", optim={"max_steps": 2, "gradient_accumulation_steps": 2},
              checkpointing={"every_n_steps": 10}, export={"enabled": False})
    session = LocalSession(tmp_path / "ckpt")
    out = run_worker(worker_args(cfg, tmp_path), session)
    info = out["model"]
    assert not info["lora"] and not info["gradient_checkpointing"] and info["pooling"] == "mean"
    assert info["trainable_params"] == info["total_params"]
    rows = read_rows(str(tmp_path / "train"))
    assert len(rows) == 2 and out["state"].micro_step == 4  # 2 optimizer steps x 2 accumulated global batches
    assert rows[0]["queries"] == 4 and rows[0]["passages"] == 12  # 2 batches x 2 queries x group 3
    assert [p.name for p in session.checkpoints()] == ["checkpoint-00000002"]  # only the final one


def test_bad_backbones_and_lora_targets(tmp_path, samples):
    from reasonembed.models.lora import LoraTargetError
    from reasonembed.redapter.model import BackboneError, backbone_type

    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(BackboneError, match="unknown backbone type 't5'"):
        backbone_type(str(folder))
    cfg = job(samples, tmp_path, model="minilm", lora={"enabled": True})
    with pytest.raises(LoraTargetError, match=r"match no Linear layer.*query.*value"):
        run_worker(worker_args(cfg, tmp_path), LocalSession(tmp_path / "ckpt"))


def test_restart_prefers_the_newest_complete_checkpoint(tmp_path, samples):
    """A restarted attempt resumes from the run's pointer when Ray Train restored nothing or an older checkpoint
    (a worker killed right after reporting can take Ray's registration of that checkpoint down with it)."""
    import contextlib

    from reasonembed.redapter.state import STATE_FILE, SavedState, TrainState, write_pointer
    from reasonembed.redapter.worker import _restored_folder

    cfg = job(samples, tmp_path / "runs", model="minilm")
    run_uri = str(tmp_path / "train")

    def checkpoint(name: str, step: int) -> Path:
        folder = tmp_path / "ray" / name
        folder.mkdir(parents=True)
        (folder / STATE_FILE).write_text(SavedState(TrainState(global_step=step), {}, {}).to_json())
        return folder

    class Restored:  # what Ray Train's get_checkpoint() gave the new worker group
        def __init__(self, folder):
            self.folder = folder

        @contextlib.contextmanager
        def restored(self):
            yield self.folder

    def pick(session, resume_from=None) -> Path | None:
        with contextlib.ExitStack() as stack:
            return _restored_folder(stack, session, run_uri, resume_from, cfg.storage)

    older, newer = checkpoint("checkpoint-00000002", 2), checkpoint("checkpoint-00000004", 4)
    assert pick(Restored(None)) is None  # a fresh run
    assert pick(Restored(None), resume_from=str(older)) == older  # the driver's pick at submission
    write_pointer(run_uri, str(newer), 4)
    assert pick(Restored(None), resume_from=str(older)) == newer  # Ray lost it; the pointer did not
    assert pick(Restored(older)) == newer  # Ray restored an older one
    assert pick(Restored(newer)) == newer
    write_pointer(run_uri, str(older), 2)
    assert pick(Restored(newer)) == newer  # Ray's is newer than the pointer: keep Ray's


def test_passage_chunks_sort_by_length_and_invert():
    from reasonembed.redapter.worker import passage_chunks

    ids = [[1] * n for n in (5, 30, 12, 30, 2, 18)]
    chunks, inverse = passage_chunks(ids, 2)
    assert chunks == [[1, 3], [5, 2], [0, 4]]  # longest first, ties by position; each chunk pads to its own first
    order = [i for c in chunks for i in c]
    assert [order[inverse[i]] for i in range(len(ids))] == list(range(len(ids)))  # concatenated outputs -> input order
    assert passage_chunks(ids, 0)[0] == [[1, 3, 5, 2, 0, 4]]  # 0: one pass


def test_ri_weights_are_measured_without_dropout(samples, tiny_qwen3_path):
    """L(q′) for the RI weights is computed in eval mode: with LoRA dropout 0.1 two computations on the same batch
    give the same weights, and the model is back in train mode afterwards (dropout still on for the trained path)."""
    from reasonembed.redapter.loss import LossConfig, RIInfoNCELoss
    from reasonembed.redapter.model import build_bi_encoder

    cfg = job(samples, "unused")
    assert cfg.lora.dropout == 0.1
    torch.manual_seed(0)
    bundle = build_bi_encoder(cfg, torch.device("cpu"), "fp32")
    for name, p in bundle.module.named_parameters():
        if "lora_B" in name:  # zero-initialised B makes the adapters, and so their dropout, a no-op
            p.data.normal_(0.0, 0.05)
    emb, module = bundle.embedder, bundle.module
    queries = ["Who took a cooking class in Peru?", "Which speaker visited Lima?"]
    passages = ["Ana: I took the ceviche course in Cusco.", "We climbed the tower at sunset.",
                "Dante: the flight to Lima was late.", "The pottery class in Kyoto was fun."]
    reasoning = [f"{q} Cusco is in Peru, so the answer is Ana." for q in queries]
    with torch.no_grad():
        q_emb, p_emb = module(emb.tokenize(queries), emb.tokenize(passages))
    loss_fn = RIInfoNCELoss(LossConfig(ri_start_step=0, cross_device=False))
    rq_in = emb.tokenize(reasoning)
    first, second = (loss_fn(q_emb, p_emb, module.encode_frozen(rq_in), step=0) for _ in range(2))
    assert first.ri_active
    assert torch.equal(first.ri, second.ri) and torch.equal(first.weights, second.weights)
    assert all(m.training for m in module.modules())
    with torch.no_grad():  # dropout is on for the trained forward, so the equality above is not vacuous
        assert not torch.equal(module(rq_in, rq_in)[0], module(rq_in, rq_in)[0])


def test_relative_data_and_model_folders_become_absolute_for_the_workers(tmp_path, monkeypatch):
    """Ray Train workers run in another working directory: a relative local model folder must reach them as an
    absolute path (it failed in the workers with 'model path does not exist'); names stay names."""
    from reasonembed.redapter.trainer import _absolute_paths

    (tmp_path / "base-model").mkdir()
    (tmp_path / "minilm").mkdir()  # a folder named like a built-in does not shadow the built-in
    monkeypatch.chdir(tmp_path)
    cfg = _absolute_paths(TrainJobConfig.model_validate({"data": {"paths": "samples"},
                                                         "embedder": {"model": "base-model"}}))
    assert cfg.embedder.model == str(tmp_path / "base-model") and cfg.data.paths == [str(tmp_path / "samples")]
    for name in ("minilm", "org/model"):
        kept = _absolute_paths(TrainJobConfig.model_validate({"data": {"paths": "s"}, "embedder": {"model": name}}))
        assert kept.embedder.model == name
