"""`reasonembed <verb>`: the same verbs as jobs/<verb>.py, plus `doctor`, `submit` and `compare`.

Every job verb takes ``--config FILE`` (default ``configs/<verb>/local-tiny.yaml``), dotted overrides ``a.b=c``, and
the most used fields as flags (``--model``, ``--data``, ``--out``, ...; each job config's ``FLAGS`` maps flags to
fields). Config problems, missing files and unreachable storage print one line and exit with code 2 before anything
is written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from reasonembed.config import ConfigError, default_config_path, job_config_class, load_job_config
from reasonembed.job_logging import open_log_file, reset_job_logging, setup_job_logging
from reasonembed.runtime import apply_env_defaults, setup_logging

# verb -> library entry "module:function" taking the validated config.
ENTRIES = {
    "encode": "reasonembed.index.encode:run",
    "evaluate": "reasonembed.evaluation.pipeline:run",
    "synthesize": "reasonembed.remixer.pipeline:run",
    "train": "reasonembed.redapter.trainer:run",
    "audit-annotator": "reasonembed.remixer.audit:run",
}
JOB_VERBS = (*ENTRIES, "serve")
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
REPO_ROOT = Path(__file__).resolve().parents[2]


def _user_errors() -> tuple[type[BaseException], ...]:
    from reasonembed.data.types import DataError
    from reasonembed.index.faiss_index import IndexMismatchError
    from reasonembed.models.registry import ModelNotFoundError
    from reasonembed.storage import StorageError

    return (ConfigError, StorageError, ModelNotFoundError, FileNotFoundError, DataError, IndexMismatchError)


def parse_job_args(verb: str, argv: list[str]) -> tuple[Path, list[str], argparse.Namespace]:
    """(config path, overrides including flag-derived ones, parsed namespace) for a job verb."""
    cls = job_config_class(verb)
    flags: dict[str, str] = dict(getattr(cls, "FLAGS", {}))
    parser = argparse.ArgumentParser(prog=f"reasonembed {verb}", description=(cls.__doc__ or "").strip())
    parser.add_argument("--config", type=Path, default=None, help=f"YAML config (default configs/{verb}/local-tiny.yaml)")
    for flag, field in flags.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, default=None, help=f"sets {field}")
    # Boolean switches (a job config's SWITCHES, e.g. synthesize's --retry-errors): present means field=true.
    switches = {f: d for f, d in getattr(cls, "SWITCHES", {}).items()
                if f"--{f.replace('_', '-')}" not in parser._option_string_actions}
    for flag, field in switches.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=f"switch_{flag}", action="store_true",
                            help=f"sets {field}=true")
    parser.add_argument("--data-dir", dest="data_dir", default=None,
                        help="the shared data folder that '{data_dir}' in a config means (sets REASONEMBED_DATA_DIR; "
                        "default ../shared/data). Give it as an absolute path on a `ray job submit` line")
    parser.add_argument("--verbose", action="store_true",
                        help="stream Ray's, Ray Data's and vLLM's logs to the console (default: to a log file under "
                        "<out>/<run_id>/logs/, path printed; also REASONEMBED_VERBOSE=1)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. embedder.max_length=512")
    ns = parser.parse_args(argv)
    path = ns.config or default_config_path(verb, Path.cwd())
    if ns.config is None and not path.is_file():
        path = default_config_path(verb, REPO_ROOT)
    overrides = list(ns.overrides)
    for flag, field in flags.items():
        value = getattr(ns, flag)
        if value is not None:
            overrides.append(f"{field}={json.dumps(value) if _needs_quoting(value) else value}")
    overrides += [f"{field}=true" for flag, field in switches.items() if getattr(ns, f"switch_{flag}")]
    return path, overrides, ns


def prepare_job(verb: str, argv: list[str]) -> tuple[Any, argparse.Namespace]:
    """Parse ``argv``, validate the config and check every input path (reasonembed.job_paths): (the job's config, the
    parsed flags), or a ConfigError before anything is written. ``--data-dir`` is exported as REASONEMBED_DATA_DIR (absolute), so
    '{data_dir}' means the same folder in this process and in the Ray workers it starts."""
    from reasonembed.job_paths import check_input_paths

    path, overrides, ns = parse_job_args(verb, argv)
    if ns.data_dir:
        os.environ["REASONEMBED_DATA_DIR"] = str(Path(ns.data_dir).expanduser().absolute())
    cfg = load_job_config(verb, path, overrides)
    check_input_paths(verb, cfg)
    return cfg, ns


def _needs_quoting(value: str) -> bool:
    # A flag value is a plain string (a path, a model name); quote anything YAML would read as another type.
    return any(c in value for c in ":#{}[],&*!|>'\"%@`") or value.lower() in {"true", "false", "null", "yes", "no"}


def _print_result(result) -> None:
    if hasattr(result, "line"):
        print(result.line())
    elif is_dataclass(result):
        print(json.dumps(asdict(result), indent=2, default=str))
    elif result is not None:
        print(json.dumps(result, indent=2, default=str))


def run_job(verb: str, argv: list[str]) -> int:
    """Validate the config, then call the library entry of ``verb``."""
    apply_env_defaults()
    setup_logging(os.environ.get("REASONEMBED_LOG_LEVEL", "INFO"))
    if verb == "serve":  # the launcher is part of the package: works from an installed wheel, in any folder
        from reasonembed.serving.http.launch import main as serve_main

        return int(serve_main(argv) or 0)
    try:
        cfg, ns = prepare_job(verb, argv)
    except ModuleNotFoundError as exc:
        print(f"reasonembed {verb}: not available in this version ({exc.name} missing)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ConfigError as exc:
        print(f"reasonembed {verb}: config error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    # Quiet unless --verbose: Ray's, Ray Data's and vLLM's logs go to <out>/<run_id>/logs/<verb>-<time>.log.
    setup_job_logging(verb, getattr(cfg, "out", None), getattr(cfg, "run_id", None), verbose=ns.verbose)
    mod_name, _, fn_name = ENTRIES[verb].partition(":")
    try:
        entry = getattr(importlib.import_module(mod_name), fn_name)
    except (ModuleNotFoundError, AttributeError) as exc:
        print(f"reasonembed {verb}: not available in this version ({exc})", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        result = entry(cfg)
    except _user_errors() as exc:
        reset_job_logging(discard=True)  # refused on bad input: a job that never started leaves no log file
        print(f"reasonembed {verb}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BaseException:
        open_log_file()  # keep what was logged before the crash
        raise
    open_log_file()
    _print_result(result)
    return 0


def doctor() -> int:
    """Print versions, hardware, which engines import, and the Ray cluster this process would use."""
    apply_env_defaults()
    import platform as std_platform

    from reasonembed.storage import package_versions

    print(f"python      {sys.version.split()[0]} on {std_platform.platform()}")
    print(f"cpus        {os.cpu_count()}")
    for name, version in package_versions().items():
        print(f"{name:<22}{version}")
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        print(f"torch       {torch.__version__}, threads {torch.get_num_threads()}, GPU: {gpu}")
    except ImportError as exc:
        print(f"torch       NOT importable: {exc}")
    for mod in ("faiss", "deepspeed", "vllm", "ray.data.llm"):
        try:
            importlib.import_module(mod)
            print(f"import {mod:<14} ok")
        except Exception as exc:  # report, never crash: this is a diagnostic
            print(f"import {mod:<14} FAILED: {type(exc).__name__}: {exc}")
    address = os.environ.get("RAY_ADDRESS")
    recorded = Path("/tmp/ray/ray_current_cluster")
    if address:
        print(f"ray cluster RAY_ADDRESS={address}")
    elif recorded.is_file():
        print(f"ray cluster recorded at {recorded.read_text().strip()} (jobs start a private one unless ray.address is set)")
    else:
        print("ray cluster none running; jobs start a private local cluster on 127.0.0.1")
    print(f"data dir    {os.environ.get('REASONEMBED_DATA_DIR', '(unset; tests use ../shared/data)')}")
    print(f"HF offline  {os.environ.get('HF_HUB_OFFLINE', '0')}")
    return 0


USAGE = """usage: reasonembed <verb> [--config FILE] [--model M] [--data D] [--out O] [--verbose] [key=value ...]

verbs:
  doctor      versions, hardware, engines, Ray cluster
  encode      corpus -> embeddings shards -> FAISS index
  evaluate    dense or BM25 retrieval on BEIR / BRIGHT / R2MED -> report.json, report.md, run.trec, PNG
  synthesize  ReMixer: documents -> queries -> mined candidates -> annotations -> training samples
  train       Redapter: RI-InfoNCE fine-tuning on Ray Train -> sentence-transformers model
  audit-annotator  LLM annotator vs a benchmark's qrels: AUC, score histograms, parse failures -> report
  serve       OpenAI-compatible embeddings + search endpoint on Ray Serve
  compare     several evaluate outputs side by side: reasonembed compare RUN_DIR... [--out DIR] [--metric M]
              -> table (md, CSV), PNG, the paper's numbers, paired significance per task
  submit      submit a job verb to a Ray cluster (reasonembed submit <verb> --address http://head:8265 ...)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else EXIT_USAGE
    verb, rest = argv[0], argv[1:]
    if verb == "doctor":
        return doctor()
    if verb == "submit":
        try:
            from reasonembed.submit import submit_cli
        except ModuleNotFoundError as exc:
            print(f"reasonembed submit: not available in this version ({exc})", file=sys.stderr)
            return EXIT_UNAVAILABLE
        return int(submit_cli(rest) or 0)
    if verb == "compare":  # reads finished reports: no config, no cluster
        from reasonembed.evaluation.compare import main as compare_main

        return compare_main(rest)
    if verb not in JOB_VERBS:
        print(f"reasonembed: unknown verb {verb!r}\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE
    return run_job(verb, rest)


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
