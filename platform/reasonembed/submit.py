"""`reasonembed submit <verb>`: run a job on a Ray cluster through the Job Submission API, and retry it when it fails.

What one call does, in order (everything before step 4 happens offline, so bad input fails before any upload):

1. validate the job config (plus dotted overrides) with the verb's pydantic model, as the job itself will;
2. with ``cluster_spec``, check that every resource bundle the config asks for fits some node type
   (``reasonembed.cluster_spec.check_resources``); otherwise the job would sit PENDING forever;
3. make paths usable on the cluster. The job runs in a temporary, unpacked copy of the working dir, so relative
   local paths (``out``, and any string field naming an existing file or folder, e.g. ``data.path``) are made
   absolute, as overrides, for a cluster on this machine; for a remote cluster they are an error;
4. reach the job API (one clear line when it cannot) and submit
   ``python jobs/<verb>.py --config <config> <overrides>`` with
   - ``runtime_env.working_dir`` = the checkout, minus venvs, runs, data, .git and caches;
   - ``PYTHONPATH=platform`` (relative to that working dir) in the runtime env, so the driver and every worker
     import the submitted ``platform/reasonembed`` ahead of any installed release;
   - the driver on a CPU node: with a cluster spec that declares a ``driver`` resource (aws-gpu.yaml: on-demand
     cpu-workers), ``{driver: 1}`` and one reserved CPU; otherwise Ray's default (on the head, no CPU held);
   - submission id ``reasonembed-<run_id>-<verb>-<attempt>``: deterministic, readable in `ray job list`, and new
     per attempt because Ray refuses to reuse an id;
5. follow the driver's logs with status lines, and on FAILED resubmit up to ``retries`` times. Ray Jobs never retry
   by themselves; a resubmitted stage skips finished shards (resume by shard: the commit protocol in storage.py), so a retry
   costs only what was unfinished. A job of the same run and verb that is still running is followed, not duplicated.

The same job also runs with plain Ray (see the YAML headers in cluster/):
``ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/<verb>.py --config <config>``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from reasonembed.cluster_spec import ResourceMismatch, check_resources
from reasonembed.config import ConfigError
from reasonembed.config.submit import SubmitOptions
from reasonembed.submit_plan import (
    SubmitError,
    SubmitPlan,
    _normalize_address,
    base_submission_id,
    is_loopback,
    plan,
    submission_id,
)

log = logging.getLogger("reasonembed.submit")

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobFailed(SubmitError):
    """The job ran and did not succeed: FAILED after the retry budget, or STOPPED."""


@dataclass
class SubmitResult:
    """Outcome of :func:`submit`: the final status and every submission id used, oldest first."""

    status: str
    submission_ids: list[str] = field(default_factory=list)
    run_root: str = ""

    @property
    def submission_id(self) -> str:
        return self.submission_ids[-1]


def connect(address: str, timeout_s: float = 5.0):
    """A ``JobSubmissionClient`` for ``address``; an unreachable or non-Ray address is one SubmitError line."""
    address = _normalize_address(address)
    url = urlparse(address)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        raise SubmitError(f"--address {address!r} has no host; expected e.g. http://127.0.0.1:8265")
    hint = ("start one with `ray start --head --dashboard-host 127.0.0.1`, open a tunnel with "
            "`ray dashboard cluster/aws-gpu.yaml`, or pass --address")
    # A TCP probe with a timeout first: the SDK's requests have none, and a firewalled host hangs for minutes.
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SubmitError(f"cannot reach the Ray job API at {address} ({reason}); {hint}") from None
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SubmitError(f"{address} answers but is not a usable Ray job API ({first}); {hint}") from None


def _existing_attempts(client, base: str) -> dict[int, str]:
    """Attempt number -> status of earlier submissions of the same run and verb."""
    pattern = re.compile(re.escape(base) + r"-(\d+)$")
    found = {}
    for job in client.list_jobs():
        m = pattern.match(job.submission_id or "")
        if m:
            found[int(m.group(1))] = str(job.status.value if hasattr(job.status, "value") else job.status)
    return found


def last_error_line(logs: str, fallback: str = "") -> str:
    """The most telling line of a failed driver's log: the last exception line, else the last non-empty line."""
    lines = [ln.strip() for ln in logs.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b.*", ln):
            return ln[:400]
    return (lines[-1] if lines else fallback)[:400]


def _wait(client, sid: str, opts: SubmitOptions, echo: Callable[[str], None]) -> str:
    """Block until ``sid`` ends; stream its logs when ``opts.follow``. Returns the final status name."""
    start = time.monotonic()

    async def poll() -> str:
        last = None
        while True:
            status = str((await asyncio.to_thread(client.get_job_status, sid)).value)
            if status != last:
                echo(f"[reasonembed submit] {sid}: {status} after {time.monotonic() - start:.0f} s")
                last = status
            if status in TERMINAL:
                return status
            await asyncio.sleep(opts.poll_interval_s)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(sid):
            for line in chunk.splitlines():
                echo(line)

    async def run() -> str:
        tail_task = asyncio.create_task(tail()) if opts.follow else None
        status = await poll()
        if tail_task is not None:
            # The log stream closes by itself once the job ends; give it a moment to flush the last lines.
            try:
                await asyncio.wait_for(tail_task, timeout=15)
            except (asyncio.TimeoutError, RuntimeError) as exc:
                tail_task.cancel()
                log.debug("log tail of %s ended early: %s", sid, exc)
        return status

    return asyncio.run(run())


def submit(
    verb: str,
    config_path: str | Path,
    overrides: Sequence[str] = (),
    options: SubmitOptions | None = None,
    *,
    script: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> SubmitResult:
    """Submit ``jobs/<verb>.py --config <config_path> <overrides>`` and wait, resubmitting a FAILED job.

    Args:
        verb: job name (encode, evaluate, synthesize, train, pipeline, ...); the script is ``jobs/<verb>.py``.
        config_path: the job's YAML config, inside the working dir (it travels with the upload).
        overrides: dotted ``key=value`` overrides, passed to the job and checked here first.
        options: how the job is handed to the cluster (:class:`SubmitOptions`: ``address``, ``retries``,
            ``follow``, ``cluster_spec``, ``wait``, ...). One object rather than a keyword per knob, so the CLI,
            the demo and tests build it once and every knob is validated in one place.
        script: entrypoint script relative to the working dir, instead of ``jobs/<verb>.py``.
        echo: where progress and log lines go (default: stdout).

    Returns the final :class:`SubmitResult` (status SUCCEEDED, or PENDING/RUNNING when ``options.wait`` is False).
    Raises ConfigError (bad config, ResourceMismatch) or SubmitError (unreachable, failed after the budget).
    """
    opts = options or SubmitOptions()
    echo = echo or _print_line
    p = plan(verb, config_path, overrides, opts, script=script)
    client = connect(opts.address, opts.connect_timeout_s)
    base = base_submission_id(p.run_id, verb)
    sid, attempt = _running_or_next(client, base, echo)
    result = SubmitResult(status="PENDING", run_root=p.run_root)
    while True:
        if sid is None:
            sid = f"{base}-{attempt}"
            _submit_attempt(client, p, opts, sid, attempt, echo)
            attempt += 1
        result.submission_ids.append(sid)
        if not opts.wait:
            result.status = str(client.get_job_status(sid).value)
            return result
        result.status = _wait(client, sid, opts, echo)
        if result.status == "SUCCEEDED":
            return result
        _raise_unless_retrying(client, sid, result, p, opts, echo)
        sid = None


def _print_line(line: str) -> None:
    print(line, flush=True)


def _running_or_next(client, base: str, echo: Callable[[str], None]) -> tuple[str | None, int]:
    """(id of an earlier attempt of this run and verb that is still running, else None; the next attempt number).

    Never run two drivers of the same stage at once: they would race on the same shards. So a running attempt is
    followed instead of resubmitted, and numbering continues after every earlier attempt (Ray refuses reused ids).
    """
    earlier = _existing_attempts(client, base)
    attempt = max(earlier, default=0) + 1
    running = sorted(n for n, st in earlier.items() if st not in TERMINAL)
    if not running:
        return None, attempt
    sid = f"{base}-{running[-1]}"
    echo(f"[reasonembed submit] {sid} is already {earlier[running[-1]]}; following it instead of resubmitting")
    return sid, attempt


def _submit_attempt(client, p: SubmitPlan, opts: SubmitOptions, sid: str, attempt: int,
                    echo: Callable[[str], None]) -> None:
    """Hand attempt ``attempt`` to the job API as ``sid``, with the plan's entrypoint, runtime env and driver
    placement; the metadata names the verb, run and attempt so `ray job list` explains itself."""
    echo(f"[reasonembed submit] submitting {sid} to {opts.address}: {p.entrypoint}")
    client.submit_job(
        entrypoint=p.entrypoint,
        submission_id=sid,
        runtime_env=p.runtime_env,
        entrypoint_num_cpus=p.entrypoint_num_cpus or None,
        entrypoint_num_gpus=opts.entrypoint_num_gpus or None,
        entrypoint_resources=p.entrypoint_resources or None,
        metadata={"reasonembed_verb": p.verb, "reasonembed_run_id": p.run_id, "attempt": str(attempt)},
    )


def _raise_unless_retrying(client, sid: str, result: SubmitResult, p: SubmitPlan, opts: SubmitOptions,
                           echo: Callable[[str], None]) -> None:
    """After ``sid`` ended without success: raise JobFailed when it was STOPPED (someone meant it) or the retry
    budget is used up, naming the driver's last error line and where finished work is kept; else announce the retry."""
    info = client.get_job_info(sid)
    reason = last_error_line(client.get_job_logs(sid), fallback=info.message or "")
    if result.status == "STOPPED":
        raise JobFailed(f"{sid} was stopped ({reason}); not retried. Resubmit to resume by shard.")
    n = len(result.submission_ids)
    if n > opts.retries:
        raise JobFailed(
            f"{p.verb} failed {n} time(s), retry budget ({opts.retries}) used up; last error: {reason} | "
            f"driver log: `ray job logs {sid} --address {opts.address}` | finished stages and shards are kept "
            f"under {p.run_root}/; the failing stage's error rows are in {p.run_root}/<stage>/errors/"
        )
    echo(f"[reasonembed submit] {sid} FAILED ({reason}); retry {n}/{opts.retries}: finished shards are kept "
         "and skipped")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `submit` subcommand's arguments (for the CLI's subparser)."""
    parser.add_argument("verb", help="job to run: jobs/<verb>.py (encode, evaluate, synthesize, train, pipeline)")
    parser.add_argument("--config", required=True, help="job config YAML inside the working dir")
    parser.add_argument("--address", default=None,
                        help="Ray job API (default: $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)")
    parser.add_argument("--retries", type=int, default=None, help="resubmissions after a failure (default 2)")
    parser.add_argument("--cluster-spec", default=None,
                        help="cluster YAML to check the config's resource requests against before submitting")
    parser.add_argument("--working-dir", default=".", help="folder uploaded as the job's working dir (default .)")
    parser.add_argument("--no-follow", action="store_true", help="do not stream the driver's logs")
    parser.add_argument("--no-wait", action="store_true", help="submit once and return (no retries)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return parser


def submit_cli(args: argparse.Namespace | Sequence[str]) -> int:
    """Entry of `reasonembed submit`: 0 on success, 1 if the job failed, 2 on bad input or no cluster."""
    if not isinstance(args, argparse.Namespace):
        # Intermixed: overrides may come before or after the options (`submit encode a=1 --address X b=2`).
        args = add_arguments(argparse.ArgumentParser(prog="reasonembed submit")).parse_intermixed_args(list(args))
    try:
        given = {"address": args.address, "retries": args.retries, "cluster_spec": args.cluster_spec}
        opts = SubmitOptions(working_dir=args.working_dir, wait=not args.no_wait, follow=not args.no_follow,
                             **{k: v for k, v in given.items() if v is not None})  # unset: the options' defaults
        result = submit(args.verb, args.config, args.overrides, opts)
    except JobFailed as exc:
        print(f"reasonembed submit: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, SubmitError) as exc:
        print(f"reasonembed submit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reasonembed submit: interrupted; the job keeps running (stop it with `ray job stop <id>`)",
              file=sys.stderr)
        return 130
    print(f"reasonembed submit: {result.submission_id} {result.status}; outputs under {result.run_root}/")
    return 0


__all__ = [
    "JobFailed",
    "ResourceMismatch",
    "SubmitError",
    "SubmitPlan",
    "SubmitResult",
    "add_arguments",
    "base_submission_id",
    "check_resources",
    "connect",
    "is_loopback",
    "last_error_line",
    "plan",
    "submission_id",
    "submit",
    "submit_cli",
]
