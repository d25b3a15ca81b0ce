"""ONNX Runtime backend for the Embedder's inference path: export once, cache, run fp32 on the CPU.

Why: ONNX Runtime with its transformer fusions runs the same fp32 maths as PyTorch with fewer, fused kernels:
``EmbedLayerNormalization``, one ``Attention`` op per layer (QKV GEMM + masked softmax), ``BiasGelu`` and
``SkipLayerNormalization`` (onnxruntime.transformers optimizer, model type ``bert``), plus its own thread pool and
no Python dispatch per op. Results equal PyTorch's to ~1e-6 (fp32 summation order only); the export checks this
before caching. Whether it is *faster* depends on the CPU: on the 2-core AMD EPYC (AVX2, no AVX-512) dev VM, one
thread, a 64 x 256-token MiniLM batch ran at 51 GFLOP/s per core in ORT vs 55 in torch 2.13 (MKL), i.e. no gain;
measure on the target machine with ``bench/encode.py --backend onnx|torch`` before switching.

Export: the legacy TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) with eager attention. Measured
with torch 2.13 / onnxruntime 1.32: it exports MiniLM in 10-30 s as one self-contained file, and its graph is the one
the BERT fusion patterns recognise (6/6 Attention fused); the dynamo exporter took 50-80 s and none of its attention
subgraphs were fused. The graph outputs ``last_hidden_state`` [B, L, D]; pooling stays with the caller (the
Embedder pools it with the same code as the torch path).

Cache: ``$REASONEMBED_CACHE/onnx`` (default ``~/.cache/reasonembed/onnx``), one folder per key, where the key hashes
the model folder (path, file names, sizes, mtimes), the export settings and the torch/transformers/onnxruntime
versions. A folder is built under a temporary name and renamed into place (atomic on one filesystem); a lock file
serialises concurrent exporters (e.g. several Ray actors starting at once), so the export runs once.

Lossy option (NOT the fp32 backend, never counted as equal to it): ``precision="int8"`` applies ORT dynamic int8
quantisation (s8 per-channel 7-bit weights, u8 activations quantised per batch) to the fused graph's MatMul and
Attention ops. Measured on 400 SciFact docs, 2 threads, AVX2 without VNNI: 2.01x the fp32 graph's speed, embeddings
up to 1.2e-2 cosine away from fp32 (mean 6.2e-3); its ranking cost is measured by ``bench/encode.py --quality``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

EXPORT_VERSION = 1  # bump when the export recipe changes, so old cache entries are not reused
OPSET = 17
# HF model types whose graphs the onnxruntime.transformers "bert" fusions understand.
_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "electra", "camembert"}
Precision = Literal["fp32", "int8"]


class OnnxExportError(RuntimeError):
    """The model could not be exported, or its ONNX graph does not reproduce the PyTorch outputs."""


def cache_root() -> Path:
    """``$REASONEMBED_CACHE/onnx`` when the variable is set, else ``~/.cache/reasonembed/onnx``."""
    base = os.environ.get("REASONEMBED_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "reasonembed") / "onnx"


def cache_key(model_path: Path, precision: Precision = "fp32", fuse: bool = True) -> str:
    """sha256 over the model folder's identity (resolved path, every file's relative name, size and mtime) and the
    export recipe (versions, opset, fusion, precision). Editing or replacing a weight file changes the key."""
    import onnxruntime
    import torch
    import transformers

    path = Path(model_path).resolve()
    h = hashlib.sha256()
    h.update(json.dumps({"path": str(path), "export": EXPORT_VERSION, "opset": OPSET, "fuse": fuse,
                         "precision": precision, "torch": torch.__version__, "transformers": transformers.__version__,
                         "onnxruntime": onnxruntime.__version__}, sort_keys=True).encode())
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


@dataclass
class ExportInfo:
    """What was built and how well it reproduces PyTorch (written next to the graph as meta.json)."""

    key: str
    model_path: str
    model_type: str
    precision: str
    fused_ops: dict
    max_abs_diff: float
    export_s: float


def _hidden_states_module(model):
    """Wrap an HF model as (input_ids, attention_mask) -> last_hidden_state, the graph's only output."""
    import torch

    class HiddenStates(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return HiddenStates(model).eval()


_TRACE_TEXTS = ["a", "The cat sat on the mat.", "Reasoning-intensive retrieval needs inference beyond keyword "
                "overlap and several steps of thought about what the query really asks for."]
# Checked on other shapes than the trace (batch 2 vs 3, another width), so a shape frozen into the graph shows up.
_CHECK_TEXTS = ["Short text.", "Microstructural development of human newborn cerebral white matter assessed in vivo "
                "by diffusion tensor magnetic resonance imaging, with relative anisotropy measured in 17 infants " * 3]


def _probe_batch(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    """A padded batch with unequal lengths, so the mask path is exercised."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def _export(model_path: Path, out_dir: Path, precision: Precision, fuse: bool, key: str) -> ExportInfo:
    """Export, fuse, optionally quantise and verify into ``out_dir`` (a fresh folder)."""
    t0 = time.time()
    hf_cfg, wrapped, tokenizer = _load_for_export(model_path)
    model_type = getattr(hf_cfg, "model_type", "")
    raw = out_dir / "raw.onnx"
    _trace(wrapped, tokenizer, raw, f"{model_path} ({model_type})")
    graph, fused_ops = _fuse(raw, out_dir, hf_cfg, fuse)
    final = out_dir / "model.onnx"
    _finish_precision(graph, final, precision)
    for tmp in (raw, out_dir / "fused.onnx"):
        tmp.unlink(missing_ok=True)
    diff = _verify(wrapped, tokenizer, final, precision, model_path)
    info = ExportInfo(key, str(model_path), model_type, precision, fused_ops, diff, round(time.time() - t0, 2))
    (out_dir / "meta.json").write_text(json.dumps(info.__dict__, indent=2))
    return info


def _load_for_export(model_path: Path):
    """(HF config, the fp32 eager model wrapped to output hidden states, tokenizer). Eager attention because the
    TorchScript exporter traces it into the subgraph the BERT fusions recognise (module docstring)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    hf_cfg = AutoConfig.from_pretrained(str(model_path))
    kwargs = {"attn_implementation": "eager", "dtype": torch.float32}
    if getattr(hf_cfg, "model_type", "") in _BERT_LIKE:
        kwargs["add_pooling_layer"] = False
    model = AutoModel.from_pretrained(str(model_path), **kwargs).eval()
    return hf_cfg, _hidden_states_module(model), AutoTokenizer.from_pretrained(str(model_path))


def _trace(wrapped, tokenizer, raw: Path, what: str) -> None:
    """Trace ``wrapped`` on a probe batch into ``raw`` with dynamic batch and sequence axes."""
    import torch

    probe = _probe_batch(tokenizer, _TRACE_TEXTS)
    args = (torch.from_numpy(probe["input_ids"]), torch.from_numpy(probe["attention_mask"]))
    axes = {"batch": 0, "seq": 1}
    dynamic = {n: {v: k for k, v in axes.items()} for n in ("input_ids", "attention_mask", "last_hidden_state")}
    try:
        # The tracer warns that transformers' mask code turns shape arithmetic into constants; those values
        # (padding_length == 0 when the mask is as wide as the ids) hold for every batch we feed, and the check
        # in _verify runs the graph on other shapes to prove it.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*aten::index.*")
            torch.onnx.export(wrapped, args, str(raw), input_names=["input_ids", "attention_mask"],
                              output_names=["last_hidden_state"], dynamic_axes=dynamic, opset_version=OPSET,
                              dynamo=False, do_constant_folding=True)
    except Exception as exc:  # the exporter raises many types; name the model and keep the cause
        raise OnnxExportError(f"ONNX export of {what} failed: {exc}") from exc


def _fuse(raw: Path, out_dir: Path, hf_cfg, fuse: bool) -> tuple[Path, dict]:
    """The graph to finish and its fused-op counts: ``out_dir/fused.onnx`` after ORT's BERT fusions when the model
    is BERT-like and ``fuse``, else ``raw`` unchanged."""
    if not (fuse and getattr(hf_cfg, "model_type", "") in _BERT_LIKE):
        return raw, {}
    from onnxruntime.transformers import optimizer

    opt = optimizer.optimize_model(str(raw), model_type="bert", num_heads=hf_cfg.num_attention_heads,
                                   hidden_size=hf_cfg.hidden_size, opt_level=0)
    fused_ops = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    graph = out_dir / "fused.onnx"
    opt.save_model_to_file(str(graph))
    return graph, fused_ops


def _finish_precision(graph: Path, final: Path, precision: Precision) -> None:
    """Write ``final``: ``graph`` itself for fp32, its dynamic int8 quantisation for ``int8``."""
    if precision != "int8":
        os.replace(graph, final)
        return
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The fused graph has contrib ops (Attention, SkipLayerNormalization) shape inference cannot type, hence
    # DefaultTensorType; Attention becomes QAttention, MatMul becomes MatMulInteger. The recipe was picked by
    # measurement (400 SciFact docs, MiniLM, 2 threads, AVX2 without VNNI; speed vs the fp32 graph, max 1 - cos):
    #   s8 weights, per-channel, reduce_range (7-bit), MatMul + Attention   2.01x  1.2e-2   <- this one
    #   same without reduce_range                                          2.06x  7.8e-3
    #   same, MatMul only (Attention left fp32)                            1.72x  1.0e-2
    #   u8 weights, per-channel                                            1.38x  8.9e-3
    #   u8 weights, per-tensor                                             1.26x  4.5e-2
    # Without reduce_range the vectors were closer but the ranking was not: bench/encode.py --quality gave SciFact
    # nDCG@10 -0.0060 against fp32 (ImpliRet -0.0033), over the 0.005 budget; reduce_range also avoids u8s8
    # saturation on CPUs without VNNI. Per-channel scales matter most: per-tensor put vectors 4.5e-2 off.
    quantize_dynamic(str(graph), str(final), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                     op_types_to_quantize=["MatMul", "Attention"],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def _verify(wrapped, tokenizer, final: Path, precision: Precision, model_path: Path) -> float:
    """Max |ONNX - PyTorch| over real tokens of a batch of another shape than the trace (padded positions are never
    pooled); raises when over the precision's tolerance, so a wrong graph is never cached."""
    import torch

    check = _probe_batch(tokenizer, _CHECK_TEXTS)
    with torch.no_grad():
        ref = wrapped(torch.from_numpy(check["input_ids"]), torch.from_numpy(check["attention_mask"])).numpy()
    got = OnnxEncoder(final, num_threads=1).last_hidden_state(check["input_ids"], check["attention_mask"])
    m = check["attention_mask"].astype(bool)
    diff = float(np.abs(got[m] - ref[m]).max())
    tol = 1e-4 if precision == "fp32" else 1.0
    if not np.isfinite(diff) or diff > tol:
        raise OnnxExportError(f"ONNX graph of {model_path} differs from PyTorch by {diff:.2e} (> {tol}); not cached")
    return diff


def ensure_onnx(model_path: str | Path, precision: Precision = "fp32", fuse: bool = True,
                cache_dir: str | Path | None = None) -> Path:
    """Path of the cached ONNX graph for ``model_path``, exporting it first when missing (see module docstring)."""
    model_path = Path(model_path).resolve()
    root = Path(cache_dir) if cache_dir else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(model_path, precision, fuse)
    final_dir = root / key
    if (final_dir / "model.onnx").is_file():
        return final_dir / "model.onnx"
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be exporting the same key: wait for it
        if (final_dir / "model.onnx").is_file():
            return final_dir / "model.onnx"
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            _export(model_path, tmp, precision, fuse, key)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is readable like any other
            os.replace(tmp, final_dir)  # atomic publish; nobody else holds the lock, so final_dir is absent
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final_dir / "model.onnx"


def pool_numpy(hidden: np.ndarray, mask: np.ndarray, pooling: str, normalize: bool) -> np.ndarray:
    """The Embedder's pooling formulas in numpy (mean: Σ m h / Σ m; cls: h_0; last_token: h at the last real
    position), then optional L2 normalisation. For callers without torch (e.g. a lean serving replica)."""
    if pooling == "mean":
        m = mask[..., None].astype(hidden.dtype)
        emb = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    elif pooling == "cls":
        emb = hidden[:, 0]
    elif pooling == "last_token":
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)  # last real position, either padding side
        emb = hidden[np.arange(hidden.shape[0]), last]
    else:
        raise ValueError(f"unknown pooling {pooling!r}")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if normalize:
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb


class OnnxEncoder:
    """An ONNX Runtime CPU session over an exported encoder graph.

    Args:
        graph: path of a ``model.onnx`` written by :func:`ensure_onnx`.
        num_threads: intra-op threads (None: all cores). One inference runs at a time per session.
        spin: let idle pool threads spin between ops. Faster on an idle machine; on a shared or oversubscribed
            one the spinning steals cycles from everyone, so it is off by default.

    Example:
        >>> enc = OnnxEncoder(ensure_onnx(path), num_threads=2)
        >>> h = enc.last_hidden_state(input_ids, attention_mask)   # float32 [B, L, D]
    """

    def __init__(self, graph: str | Path, num_threads: int | None = None, spin: bool = False):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = num_threads or (os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.graph = Path(graph)
        self.session = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}

    def last_hidden_state(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """float32 [B, L, D] token states of a padded batch (int64 ids and mask, [B, L])."""
        feed = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)}
        return self.session.run(["last_hidden_state"], {k: v for k, v in feed.items() if k in self.input_names})[0]

    def pooled(self, input_ids: np.ndarray, attention_mask: np.ndarray, pooling: str = "mean",
               normalize: bool = True) -> np.ndarray:
        """float32 [B, D] pooled (and normalised) embeddings of a padded batch."""
        return pool_numpy(self.last_hidden_state(input_ids, attention_mask), np.asarray(attention_mask), pooling,
                          normalize)
