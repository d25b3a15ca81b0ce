"""Options of `reasonembed submit`: where the cluster is, what is uploaded, where the driver runs, how often to retry.

These are not a job's config (that is the file passed with ``--config``); they say how that job is handed to a Ray
cluster through the Job Submission API. Defaults suit `ray start --head` on this machine.
"""

from __future__ import annotations

import os

from pydantic import Field

from reasonembed.config.base import StrictModel

# Never uploaded: environments, outputs, data, VCS and tool caches, as .gitignore-style patterns relative to the working
# dir (Ray also honours the repository's own .gitignore). Top-level folders are anchored with a leading "/": a bare
# "data" would also drop the library's own package platform/reasonembed/data/.
DEFAULT_EXCLUDES = [
    "/.venv",
    "/venv",
    "/runs",
    "/data",
    "/build",
    "/dist",
    "/.git",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".hypothesis",
    "*.egg-info",
]


class SubmitOptions(StrictModel):
    """How `reasonembed submit` hands a job to a Ray cluster."""

    address: str = Field(
        default_factory=lambda: os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
        description="Ray dashboard / job API address of the cluster (http://host:8265). Defaults to "
        "RAY_API_SERVER_ADDRESS when set. For aws-gpu.yaml, run `ray dashboard cluster/aws-gpu.yaml` first and "
        "keep the default.",
    )
    retries: int = Field(
        2, ge=0, le=20,
        description="Resubmissions after a FAILED job (Ray Jobs never retry by themselves). Each retry resumes "
        "by shard, so it redoes only unfinished shards. 0: submit once.",
    )
    follow: bool = Field(True, description="Stream the driver's logs while waiting; False: print status only.")
    wait: bool = Field(
        True, description="Wait for the job to end (needed for retries). False: submit once and return its id."
    )
    working_dir: str = Field(
        ".", description="Folder uploaded as the job's working dir (the repository root: jobs/ and configs/)."
    )
    excludes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDES),
        description="Patterns never uploaded (.gitignore syntax, relative to working_dir).",
    )
    python: str = Field(
        "python", description="Interpreter in the entrypoint, resolved on the cluster (its PATH, not yours)."
    )
    entrypoint_num_cpus: float | None = Field(
        None, ge=0,
        description="CPUs reserved for the job driver. None: 1 when the cluster spec declares a `driver` resource "
        "(the driver then gets a real CPU on an on-demand cpu-worker, never the head or a spot GPU node), else 0, "
        "Ray's own default (the driver runs on the head without holding a CPU; reserving one would leave a 2-CPU "
        "local cluster one CPU short of a read task plus an actor, and the job would stall).",
    )
    entrypoint_num_gpus: float = Field(0.0, ge=0, description="GPUs reserved for the driver (0: drivers never "
                                       "hold a GPU; the stages' actors do).")
    entrypoint_resources: dict[str, float] | None = Field(
        None,
        description="Custom resources for the driver. None: {driver: 1} when the cluster spec declares a `driver` "
        "resource (aws-gpu.yaml: on-demand cpu-worker nodes), else none.",
    )
    cluster_spec: str | None = Field(
        None,
        description="Cluster YAML (cluster/*.yaml, launcher or KubeRay) to check the job's resource requests "
        "against before submitting. None: no check.",
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment for the driver and every worker of the job. REASONEMBED_* variables set "
        "where you run submit are passed along too.",
    )
    poll_interval_s: float = Field(2.0, gt=0, description="Seconds between job status polls.")
    connect_timeout_s: float = Field(
        5.0, gt=0, description="Seconds to wait for the job API's TCP port before reporting it unreachable."
    )
