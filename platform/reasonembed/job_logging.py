"""Quiet job logging: the console gets this library's own lines and progress; Ray's and vLLM's logs go to a file.

Quiet mode (the default for the CLI verbs and jobs/*.py; ``--verbose`` or ``REASONEMBED_VERBOSE=1`` turns it off),
set up by :func:`setup_job_logging` and applied to Ray by :func:`connect_ray`:

- the console keeps this library's own log records (``reasonembed.*``, INFO and up: a few lines per job), the
  progress lines of ``reasonembed.progress``, other libraries' warnings, and errors from anyone;
- everything else goes to one log file per job, ``<out>/<run_id>/logs/<verb>-<timestamp>.log`` (a temp file when the
  run folder is not local), whose path is printed once ("logs: PATH") when the job starts its real work (it
  connects to Ray; a job refused on bad input writes no file): the ``ray``/``ray.data``/``vllm``/``faiss``/
  ``transformers`` loggers of this process (their console handlers are removed and they propagate to the root
  logger's file handler), Ray Data's own logging config (``RAY_DATA_LOGGING_CONFIG``, so Ray Data re-reading its
  config keeps the routing), Ray Data's progress reporting (its bars are off on a terminal, its non-terminal
  "logging progress" lines land in the file) and the output of every Ray worker forwarded to this driver (Ray's
  ``log_to_driver`` stream, vLLM engine actors included), which goes to the file instead of stdout/stderr.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("reasonembed")

VERBOSE_ENV = "REASONEMBED_VERBOSE"
# Loggers whose records go to the job's log file in quiet mode (the console gets their errors only). transformers:
# its per-model "LOAD REPORT" warnings (e.g. MiniLM's unused pooler weights) are a dozen lines of noise per load.
ROUTED_LOGGERS = ("ray", "vllm", "faiss", "transformers")
_WORKER_HANDLER = "reasonembed_log_file"  # our name in Ray's worker-output dispatcher
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S")
    # The same loader logs "Loading faiss ..." at INFO on every import (see apply_env_defaults): not worth a line.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def is_verbose(flag: bool | None = None) -> bool:
    """``--verbose`` when given, else REASONEMBED_VERBOSE (1/true/yes)."""
    if flag:
        return True
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def job_log_path(verb: str, out: str | None = None, run_id: str | None = None) -> Path:
    """``<out>/<run_id>/logs/<verb>-<timestamp>.log`` for a local run folder, else a path in the temp dir.

    Nothing is created here (a job that stops on bad input writes nothing): the file appears with its first record
    once the job really starts (:class:`_LazyFileHandler`)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if out and run_id and "://" not in out:
        folder = Path(out).expanduser().resolve() / run_id / "logs"
    else:
        folder = Path(tempfile.gettempdir())
        verb = f"reasonembed-{verb}"
    path, n = folder / f"{verb}-{stamp}.log", 1
    while path.exists():  # two jobs of the same verb in the same second
        n += 1
        path = folder / f"{verb}-{stamp}-{n}.log"
    return path


class _LazyFileHandler(logging.Handler):
    """A file handler that keeps records in memory until :meth:`open` (called when the job starts real work:
    :func:`connect_ray`, or the job's end), so a job refused on bad input leaves no log file behind (the CLI's
    "nothing is written" rule); :meth:`discard` drops them."""

    MAX_BUFFERED = 10_000

    def __init__(self, path: Path):
        super().__init__(logging.INFO)
        self.path = path
        self.stream = None
        self._buffer: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def open(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.stream = open(self.path, "a", encoding="utf-8")
            except OSError:  # a read-only run folder: keep the log anyway, in the temp dir
                fd, name = tempfile.mkstemp(prefix=f"reasonembed-{self.path.stem}-", suffix=".log")
                self.path, self.stream = Path(name), os.fdopen(fd, "a", encoding="utf-8")
            # Printed once, when the file exists: a job refused on bad input names no file it never wrote.
            print(f"logs: {self.path}", file=sys.stderr, flush=True)
            for record in self._buffer:
                self.stream.write(self.format(record) + "\n")
            self._buffer.clear()
            self.stream.flush()
        finally:
            self.release()

    def discard(self) -> None:
        self._buffer.clear()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self.stream is None:
                if len(self._buffer) < self.MAX_BUFFERED:
                    self._buffer.append(record)
                return
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)

    def write_lines(self, lines: list[str]) -> None:
        """Raw lines (forwarded worker output), written as they are."""
        if self.stream is None:
            self.open()
        self.acquire()
        try:
            for line in lines:
                self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.close()
                self.stream = None
            self._buffer.clear()
        finally:
            self.release()
        super().close()


def _is_routed(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in ROUTED_LOGGERS)


class _ConsoleFilter(logging.Filter):
    """What a console handler shows in quiet mode: reasonembed's records, others' warnings, routed loggers' errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name == "reasonembed" or name.startswith("reasonembed."):
            return True
        if _is_routed(name):
            return record.levelno >= logging.ERROR
        if name == "py.warnings":  # warnings raised inside Ray / vLLM code are theirs to fix: file only
            msg = str(record.msg)
            return not any(f"{os.sep}{p}{os.sep}" in msg for p in ROUTED_LOGGERS)
        return record.levelno >= logging.WARNING


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def _is_terminal(handler: logging.Handler) -> bool:
    """A console handler writing to this process's stdout/stderr (not, e.g., a test's capture buffer)."""
    std = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return _is_console(handler) and (getattr(handler, "stream", None) in std
                                     or type(handler).__name__ in ("PlainRayHandler", "_StderrHandler"))


@dataclass
class _Quiet:
    """What quiet mode changed, so that :func:`reset_job_logging` can undo it (tests, repeated set-ups)."""

    path: Path
    handler: _LazyFileHandler
    console_filter: _ConsoleFilter = field(default_factory=_ConsoleFilter)
    filtered: list[logging.Handler] = field(default_factory=list)
    rerouted: dict[str, tuple[list[logging.Handler], bool]] = field(default_factory=dict)
    ray_data_config: Path | None = None
    captured_warnings: bool = False
    root_level: int = logging.NOTSET
    hf_bars_disabled: bool = False


_quiet: _Quiet | None = None


def log_file() -> Path | None:
    """The current job's log file in quiet mode, else None."""
    return _quiet.handler.path if _quiet else None


def open_log_file() -> Path | None:
    """Create the quiet-mode log file now and write what was logged so far (connect_ray does it)."""
    if _quiet is None:
        return None
    _quiet.handler.open()
    return _quiet.handler.path


def setup_job_logging(verb: str, out: str | None = None, run_id: str | None = None, verbose: bool | None = None,
                      level: str | None = None) -> Path | None:
    """Console logging for a job, quiet unless ``verbose`` (see the module docstring). Returns the log file or None.

    Call it once at the start of a job (the CLI does, after reading the config); :func:`connect_ray` then applies
    the routing to Ray. The file is created, and ``logs: PATH`` printed once to stderr, when the job starts real
    work (:func:`connect_ray`, :func:`open_log_file`); until then records wait in memory.
    """
    setup_logging(level or os.environ.get("REASONEMBED_LOG_LEVEL", "INFO"))
    reset_job_logging()
    if is_verbose(verbose):
        return None
    global _quiet
    path = job_log_path(verb, out, run_id)
    handler = _LazyFileHandler(path)
    root = logging.getLogger()
    q = _Quiet(path=path, handler=handler, root_level=root.level)
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    for h in root.handlers:
        if _is_terminal(h) and q.console_filter not in h.filters:
            h.addFilter(q.console_filter)
            q.filtered.append(h)
    if not logging.getLogger("py.warnings").handlers:
        logging.captureWarnings(True)
        q.captured_warnings = True
    _quiet = q
    if importlib.util.find_spec("ray") is not None:
        # `import ray` gives the "ray" logger its console handler (ray/__init__.py: log.generate_logging_config());
        # import it now so that the handler exists to be routed, even for Ray's client-side logs (job submission,
        # working-dir packaging) that run before any connect_ray.
        import ray  # noqa: F401
    q.hf_bars_disabled = _quiet_transformers()
    route_loggers()
    return path


def _quiet_transformers() -> bool:
    """transformers adds its own stderr handler when first imported and draws a "Loading weights" bar per model:
    configure it now (every job verb loads a model through it anyway) so that its handler can be routed, and
    switch its bars off in this process."""
    if importlib.util.find_spec("transformers") is None:
        return False
    try:
        from transformers.utils import logging as hf_logging

        if not hf_logging.is_progress_bar_enabled():
            return False
        hf_logging.disable_progress_bar()
        return True
    except Exception as exc:  # never fail a job over logging
        log.debug("transformers logging not configured: %s", exc)
        return False


def route_loggers() -> None:
    """Loggers with a console handler of their own (Ray's, vLLM's): drop it and let records reach the root's file
    handler (and, filtered, its console). Runs again whenever Ray or Ray Data may have (re)configured logging."""
    q = _quiet
    if q is None:
        return
    names = [n for n in list(logging.root.manager.loggerDict) if _is_routed(n)]
    for name in names:
        lg = logging.getLogger(name)
        console = [h for h in lg.handlers if _is_console(h)]
        if not console:
            continue
        q.rerouted.setdefault(name, (list(lg.handlers), lg.propagate))
        for h in console:
            lg.removeHandler(h)
        lg.propagate = True


def _route_ray_data() -> None:
    """Ray Data (re)configures the ``ray.data`` logger from RAY_DATA_LOGGING_CONFIG when imported and whenever a
    worker-side context switch happens in this process (ray/data/_internal/logging.py ``configure_logging``); point
    that variable at a config without the console handler, and re-apply it if Ray Data is already imported."""
    q = _quiet
    if q is None or q.ray_data_config is not None or os.environ.get("RAY_DATA_LOGGING_CONFIG"):
        return
    import yaml

    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"ray": {"format": "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}},
        "handlers": {"file": {"class": "ray.data._internal.logging.SessionFileHandler", "formatter": "ray",
                              "filename": "ray-data.log"}},
        # Propagate: the root logger's handlers (our job log file; errors on the console) get the records.
        "loggers": {"ray.data": {"level": "DEBUG", "handlers": ["file"], "propagate": True}},
    }
    fd, name = tempfile.mkstemp(prefix="reasonembed-ray-data-logging-", suffix=".yaml")
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(config, fh)
    q.ray_data_config = Path(name)
    os.environ["RAY_DATA_LOGGING_CONFIG"] = name
    if "ray.data" in sys.modules:
        try:
            from ray.data._internal.logging import configure_logging

            configure_logging()
        except Exception as exc:  # private module: never fail a job over logging
            log.debug("could not re-apply Ray Data's logging config: %s", exc)


def _quiet_ray_data_progress() -> None:
    """Ray Data draws its own tqdm/rich bars on a terminal; quiet mode shows reasonembed.progress lines instead.
    (Without a terminal it logs progress through the ``ray.data`` logger, which now goes to the file.)"""
    if not sys.stdout.isatty():
        return
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def _write_worker_output(data: dict) -> None:
    """Ray's forwarded worker stdout/stderr (a batch of lines of one worker) -> the job log file."""
    q = _quiet
    if q is None:
        return
    who = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}{', ip=' + data['ip'] if data.get('ip') else ''})"
    q.handler.write_lines([f"{prefix} {line}" for line in data.get("lines", [])])


def _route_worker_output() -> None:
    """Send the worker output Ray forwards to this driver (``log_to_driver``) to the log file, not to stdout.

    Ray prints it from a dispatcher with one handler named ``ray_print_logs`` (ray/_private/worker.py ``connect``);
    swapping that handler keeps the stream (so vLLM's and Ray Data's worker logs are in the file) without the
    console. Private API: if it moves, the output stays on the console, which is the verbose behaviour.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    names = {name for name, _ in dispatcher.handlers}
    if "ray_print_logs" in names:
        dispatcher.remove_handler("ray_print_logs")
        if _WORKER_HANDLER not in names:
            dispatcher.add_handler(_WORKER_HANDLER, _write_worker_output)


def reset_job_logging(discard: bool = False) -> None:
    """Undo :func:`setup_job_logging` (back to plain console logging). ``discard``: a log file not created yet
    stays uncreated (the job was refused on bad input); otherwise what was buffered is written."""
    global _quiet
    q, _quiet = _quiet, None
    if q is None:
        return
    root = logging.getLogger()
    root.removeHandler(q.handler)
    root.setLevel(q.root_level)
    if discard:
        q.handler.discard()
    elif q.handler.stream is None and q.handler._buffer:
        q.handler.open()
    q.handler.close()
    for h in q.filtered:
        h.removeFilter(q.console_filter)
    for name, (handlers, propagate) in q.rerouted.items():
        lg = logging.getLogger(name)
        for h in handlers:
            if h not in lg.handlers:
                lg.addHandler(h)
        lg.propagate = propagate
    if q.ray_data_config is not None:
        if os.environ.get("RAY_DATA_LOGGING_CONFIG") == str(q.ray_data_config):
            del os.environ["RAY_DATA_LOGGING_CONFIG"]
        q.ray_data_config.unlink(missing_ok=True)
        if "ray.data" in sys.modules:  # back to Ray Data's default config (its console handler)
            try:
                from ray.data._internal.logging import configure_logging

                configure_logging()
            except Exception as exc:
                log.debug("could not restore Ray Data's logging config: %s", exc)
    if q.captured_warnings:
        logging.captureWarnings(False)
    if q.hf_bars_disabled:
        from transformers.utils import logging as hf_logging

        hf_logging.enable_progress_bar()
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    if any(name == _WORKER_HANDLER for name, _ in dispatcher.handlers):
        dispatcher.remove_handler(_WORKER_HANDLER)
        import ray

        if ray.is_initialized():
            import functools

            from ray._private import worker as ray_worker

            dispatcher.add_handler("ray_print_logs", functools.partial(
                ray_worker.print_to_stdstream,
                ignore_prefix=ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)))


def route_after_init() -> None:
    _route_ray_data()
    route_loggers()
    _route_worker_output()
    _quiet_ray_data_progress()


def active() -> bool:
    """True once :func:`setup_job_logging` turned quiet mode on for this process."""
    return _quiet is not None
