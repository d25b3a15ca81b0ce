"""Fault injection for the resume tests: SIGKILL one training worker right after a given optimizer step, once.

Set on the driver (the trainer forwards it to the workers):
    REASONEMBED_TRAIN_KILL_AT_STEP=3  REASONEMBED_TRAIN_KILL_RANK=1  REASONEMBED_TRAIN_KILL_MARKER=/tmp/killed
The marker file is created before the kill, so the restarted worker group trains through. A SIGKILL is what an
OOM kill or a lost node looks like to Ray: no exception, no cleanup, the actor just dies.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV_STEP = "REASONEMBED_TRAIN_KILL_AT_STEP"
ENV_RANK = "REASONEMBED_TRAIN_KILL_RANK"
ENV_MARKER = "REASONEMBED_TRAIN_KILL_MARKER"


def fault_from_env() -> dict | None:
    if not os.environ.get(ENV_STEP):
        return None
    marker = os.environ.get(ENV_MARKER)
    if not marker:
        raise ValueError(f"{ENV_STEP} needs {ENV_MARKER} (a file path that makes the kill happen once)")
    return {"step": int(os.environ[ENV_STEP]), "rank": int(os.environ.get(ENV_RANK, "0")), "marker": marker}


def maybe_kill(fault: dict | None, global_step: int, rank: int) -> None:
    """Kill this process if ``fault`` targets this rank at this step and the marker does not exist yet."""
    if not fault or global_step != fault["step"] or rank != fault["rank"]:
        return
    try:
        fd = os.open(Path(fault["marker"]), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"killed rank {rank} pid {os.getpid()} after step {global_step}\n".encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
