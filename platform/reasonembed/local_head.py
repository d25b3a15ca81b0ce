"""Start and stop one private Ray head on this machine, bound to 127.0.0.1, without touching anyone else's Ray.

`ray stop` kills every Ray process on the machine (docs/operations.md, "`ray stop`"), which is wrong on a shared box, in CI runners
that host several jobs, and in tests. ``LocalHead`` instead:

1. starts ``ray start --head`` as the leader of a new POSIX session (``start_new_session=True``) with its own
   ``--temp-dir``, so every daemon it forks (GCS, raylet, dashboard, monitor, and worker nodes that a fake
   autoscaler launches from the monitor) inherits that session id;
2. on stop, collects the processes whose session id is that one or whose command line names the private temp dir,
   plus all their descendants (job drivers run under ``start_new_session=True`` of their own, but stay children of
   the job supervisor), sends SIGTERM, waits, then SIGKILLs what is left.

Every port is chosen free on 127.0.0.1 (GCS, dashboard, client server, dashboard agent), so two heads can coexist.

Example::

    with LocalHead.start(num_cpus=2) as head:
        JobSubmissionClient(head.dashboard_url).submit_job(entrypoint="python -c 'print(1)'")
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

log = logging.getLogger("reasonembed.local_head")


class _PortTaken(RuntimeError):
    """`ray start` lost a race for one of the free ports it was given."""

# Environment every locally started head gets (docs/operations.md, "Ray on one machine": loopback binding, explicit auth mode, no telemetry).
HEAD_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class StartLimits:
    """How patient :meth:`LocalHead.start` is. Both only matter on a slow or busy machine, so they travel together
    as one optional argument.

    Attributes:
        timeout_s: per attempt, for ``ray start --head`` to return and then for the job API to answer.
        attempts: starts tried in all, each with new free ports, when Ray loses a port to another process.
    """

    timeout_s: float = 180
    attempts: int = 3


@dataclass
class LocalHead:
    """A running private Ray head. Create it with :meth:`start`; stop it with :meth:`stop` (or a ``with`` block)."""

    temp_dir: Path
    gcs_port: int
    dashboard_port: int
    session_id: int
    stopped: bool = field(default=False, init=False)

    @property
    def address(self) -> str:
        """GCS address, for ``ray.init(address=...)`` and ``ray status --address``."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """Job API / dashboard address, for ``JobSubmissionClient`` and ``reasonembed submit --address``."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @classmethod
    def start(
        cls,
        num_cpus: int = 1,
        num_gpus: int | None = None,
        resources: dict[str, float] | None = None,
        object_store_mb: int = 128,
        autoscaling_config: str | Path | dict | None = None,
        env: dict[str, str] | None = None,
        limits: StartLimits | None = None,
    ) -> LocalHead:
        """Run ``ray start --head`` on 127.0.0.1 with free ports and a private temp dir; return once it is up.

        ``autoscaling_config`` makes the head run the autoscaler monitor with that cluster spec. Given as a dict
        with ``provider.type: fake_multinode`` (Ray's fake multi-node provider; pass ``RAY_FAKE_CLUSTER=1`` in
        ``env``), its ``provider.gcs_address`` is set to this head's GCS port, so worker raylets join this head.
        The Python environment that runs this (``sys.executable``'s folder) is put first on PATH so a job's
        ``python`` resolves to it.

        Free ports are picked, then bound by Ray a moment later; on a busy machine another process can take one in
        between. Such a start is cleaned up and retried with new ports, up to ``limits.attempts`` times
        (:class:`StartLimits`).
        """
        limits = limits or StartLimits()
        last_error = ""
        for _ in range(limits.attempts):
            try:
                return cls._start_once(num_cpus, num_gpus, resources, object_store_mb, autoscaling_config, env,
                                       limits.timeout_s)
            except _PortTaken as exc:
                last_error = str(exc)
                log.warning("ray start hit a port taken by another process; retrying with new ports")
        raise RuntimeError(f"`ray start --head` failed {limits.attempts} times on taken ports:\n{last_error}")

    @classmethod
    def _start_once(cls, num_cpus, num_gpus, resources, object_store_mb, autoscaling_config, env, timeout_s):
        # Short path: Ray puts AF_UNIX sockets under it, and those paths are limited to 107 bytes.
        tdir = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))
        gcs_port, dashboard_port = free_port(), free_port()
        ray_exe = Path(sys.executable).with_name("ray")
        cmd = [
            str(ray_exe) if ray_exe.exists() else "ray",
            "start", "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--num-cpus={num_cpus}",
            f"--object-store-memory={object_store_mb * 2**20}",
            f"--temp-dir={tdir}",
            "--disable-usage-stats",
        ]
        if num_gpus is not None:
            cmd.append(f"--num-gpus={num_gpus}")
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        if isinstance(autoscaling_config, dict):
            spec = copy.deepcopy(autoscaling_config)
            if spec.get("provider", {}).get("type") == "fake_multinode":
                spec["provider"]["gcs_address"] = f"127.0.0.1:{gcs_port}"
            autoscaling_config = tdir / "autoscaling.yaml"
            autoscaling_config.write_text(yaml.safe_dump(spec))
        if autoscaling_config is not None:
            cmd.append(f"--autoscaling-config={autoscaling_config}")
        full_env = {**os.environ, **HEAD_ENV, **(env or {})}
        full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
        # The `ray start` process becomes a session leader; its pid is the session id all daemons inherit.
        proc = subprocess.Popen(
            cmd, env=full_env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        head = cls(temp_dir=tdir, gcs_port=gcs_port, dashboard_port=dashboard_port, session_id=proc.pid)
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            head.stop()
            raise RuntimeError(f"`ray start --head` did not return within {timeout_s:.0f} s") from None
        if proc.returncode != 0:
            head.stop()
            if "already in use" in out or "Failed to start the grpc server" in out:
                raise _PortTaken(out[-3000:])
            raise RuntimeError(f"`ray start --head` failed (exit {proc.returncode}):\n{out[-3000:]}")
        # The dashboard moves to another port by itself when its port is taken (--port-retries); believe Ray.
        shown = re.search(r"http://127\.0\.0\.1:(\d+)", out)
        if shown:
            head.dashboard_port = int(shown.group(1))
        head._wait_for_dashboard(timeout_s)
        log.info("local Ray head up: gcs %s, dashboard %s, temp dir %s", head.address, head.dashboard_url, tdir)
        return head

    def _wait_for_dashboard(self, timeout_s: float) -> None:
        """The job API answers a little after `ray start` returns; poll its version endpoint."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Ray dashboard at {self.dashboard_url} did not come up in {timeout_s:.0f} s ({last})")

    def processes(self) -> list[psutil.Process]:
        """Every live process of this head: same session, or naming our temp dir, plus their descendants."""
        # The temp dir followed by a separator or the end, so /tmp/rh-a never matches /tmp/rh-ab.
        marker = re.compile(re.escape(str(self.temp_dir)) + r"(?=$|[/\s'\"])")
        roots: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid == os.getpid():
                    continue
                if os.getsid(p.pid) == self.session_id or marker.search(" ".join(p.info["cmdline"] or [])):
                    roots[p.pid] = p
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        found = dict(roots)
        for p in roots.values():
            try:
                for child in p.children(recursive=True):
                    if child.pid != os.getpid():
                        found[child.pid] = child
            except psutil.Error:
                continue
        return list(found.values())

    def stop(self, grace_s: float = 10) -> int:
        """SIGTERM this head's processes, SIGKILL survivors after ``grace_s``; remove our temp dir. Returns count."""
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        # Worker nodes launched late (by a monitor that was still running) are caught by a second sweep.
        late = self.processes()
        for p in late:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(late, timeout=5)
        self.stopped = True
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return len(procs) + len(late)

    def __enter__(self) -> LocalHead:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
