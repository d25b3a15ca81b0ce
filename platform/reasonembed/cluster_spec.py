"""What each node type of a cluster spec provides, and whether a job config asks for something none provides.

A job config pins work to a node role through Ray custom resources, e.g. a vLLM stage with
``resources: {gpu_infer: 1}`` and ``num_gpus: 1`` (see cluster/aws-gpu.yaml). Ray only schedules a task or actor on a
node that holds *all* of its bundle, and the autoscaler only launches a node type whose declared resources cover it.
A bundle that no node type covers is never an error in Ray: the job just stays PENDING forever, with a warning in the
autoscaler log. ``check_resources`` turns that into an error before submission.

Specs understood:

- Ray cluster-launcher YAML with ``available_node_types`` (aws-gpu.yaml, fake-multinode.yaml): each type's
  ``resources``.
- Ray cluster-launcher YAML without node types (``provider: local``, local.yaml): one node whose custom resources are
  read from ``--resources='{...}'`` in its ``ray start`` commands.
- KubeRay ``RayJob`` / ``RayCluster`` manifests (kuberay-rayjob.yaml): head and worker groups, custom resources from
  ``rayStartParams.resources``, CPU/GPU from ``num-cpus``/``num-gpus`` or the container limits.

Standard resources (CPU, GPU, memory, object_store_memory) that a node type does not declare are detected by Ray
when the node starts, so they are not checked; custom resources exist only where declared.

Requests are found by walking the config: every mapping under a key named ``resources``, ``resources_per_worker`` or
``entrypoint_resources`` is one bundle, joined with ``num_cpus``/``num_gpus``/``accelerator_type`` set next to it
(``accelerator_type: H100`` is Ray's resource ``accelerator_type:H100``; Ray Train's ``use_gpu: true`` is ``GPU: 1``).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasonembed.config.base import ConfigError, read_yaml

STANDARD = {"CPU", "GPU", "memory", "object_store_memory"}
REQUEST_KEYS = ("resources", "resources_per_worker", "entrypoint_resources")
# Sibling fields folded into a bundle, with the Ray resource each one means.
SIBLINGS = {"num_cpus": "CPU", "num_gpus": "GPU", "num_cpus_per_actor": "CPU", "num_gpus_per_actor": "GPU"}


class ResourceMismatch(ConfigError):
    """A config asks for a resource bundle that no node type of the cluster spec can hold."""


@dataclass(frozen=True)
class ResourceRequest:
    """One bundle a config asks for, and the dotted path of the field that asks."""

    path: str
    bundle: dict[str, float]


def node_types(spec: dict[str, Any] | str | Path) -> dict[str, dict[str, float]]:
    """Node type name -> declared resources, for a launcher YAML or a KubeRay manifest (path or parsed dict)."""
    data = read_yaml(spec) if isinstance(spec, str | Path) else spec
    if data.get("kind") in ("RayJob", "RayCluster"):
        return _kuberay_node_types(data)
    types = data.get("available_node_types")
    if types:
        return {name: {k: float(v) for k, v in (t.get("resources") or {}).items()} for name, t in types.items()}
    commands = [*(data.get("head_start_ray_commands") or []), *(data.get("worker_start_ray_commands") or [])]
    return {"local": _resources_from_start_commands(commands)}


def _resources_from_start_commands(commands: list[str]) -> dict[str, float]:
    """Parse ``--resources='{"a": 1}'`` (and --num-cpus/--num-gpus) out of `ray start` shell lines."""
    found: dict[str, float] = {}
    for line in commands:
        try:
            tokens = shlex.split(line)
        except ValueError:
            continue
        for i, tok in enumerate(tokens):
            key, _, value = tok.partition("=")
            if not value and i + 1 < len(tokens) and key in ("--resources", "--num-cpus", "--num-gpus"):
                value = tokens[i + 1]
            if key == "--resources" and value:
                found.update({k: float(v) for k, v in json.loads(value).items()})
            elif key == "--num-cpus" and value:
                found["CPU"] = float(value)
            elif key == "--num-gpus" and value:
                found["GPU"] = float(value)
    return found


def _kuberay_node_types(manifest: dict[str, Any]) -> dict[str, dict[str, float]]:
    spec = manifest.get("spec") or {}
    cluster = spec.get("rayClusterSpec", spec) if manifest.get("kind") == "RayJob" else spec
    groups = [("head", cluster.get("headGroupSpec") or {})]
    groups += [(g.get("groupName", f"group-{i}"), g) for i, g in enumerate(cluster.get("workerGroupSpecs") or [])]
    out: dict[str, dict[str, float]] = {}
    for name, group in groups:
        params = group.get("rayStartParams") or {}
        res: dict[str, float] = {}
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
        limits = ((containers[0].get("resources") or {}).get("limits") or {}) if containers else {}
        if "nvidia.com/gpu" in limits:
            res["GPU"] = float(limits["nvidia.com/gpu"])
        if "num-cpus" in params:
            res["CPU"] = float(params["num-cpus"])
        if "num-gpus" in params:
            res["GPU"] = float(params["num-gpus"])
        raw = params.get("resources")
        if raw:
            # KubeRay's convention wraps the JSON in an extra pair of quotes: '"{\"gpu_infer\": 8}"'.
            text = raw.strip()
            if text.startswith('"') and text.endswith('"'):
                text = json.loads(text)
            res.update({k: float(v) for k, v in json.loads(text).items()})
        out[name] = res
    return out


def find_requests(config: dict[str, Any], prefix: str = "") -> list[ResourceRequest]:
    """Every resource bundle a (nested) config dict asks for, with its dotted path."""
    found: list[ResourceRequest] = []
    if isinstance(config, dict):
        bundle: dict[str, float] = {}
        where = None
        for key in REQUEST_KEYS:
            value = config.get(key)
            if isinstance(value, dict) and value:
                bundle.update({str(k): float(v) for k, v in value.items() if _is_number(v)})
                where = where or f"{prefix}{key}"
        if where is not None:
            for key, std in SIBLINGS.items():
                if _is_number(config.get(key)) and config[key] > 0:
                    bundle[std] = float(config[key])
            if config.get("use_gpu") is True and "GPU" not in bundle:
                bundle["GPU"] = 1.0  # Ray Train's use_gpu: one GPU per worker unless resources say otherwise
            accel = config.get("accelerator_type")
            if isinstance(accel, str) and accel:
                bundle[f"accelerator_type:{accel}"] = 0.001
            found.append(ResourceRequest(where, bundle))
        for key, value in config.items():
            if key in REQUEST_KEYS:
                continue
            found += find_requests(value, f"{prefix}{key}.")
    elif isinstance(config, list):
        for i, item in enumerate(config):
            found += find_requests(item, f"{prefix}{i}.")
    return found


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def fits(bundle: dict[str, float], provided: dict[str, float], detects_accelerator: bool = False) -> bool:
    """Whether one node with ``provided`` resources can hold ``bundle``.

    Undeclared standard resources are unchecked (Ray detects them at node start). ``accelerator_type:<X>`` is
    unchecked too when ``detects_accelerator``: on a fixed cluster Ray adds it by itself, while an autoscaler can only
    launch a node type for it when the type declares it.
    """
    for name, amount in bundle.items():
        if name in provided:
            if provided[name] + 1e-9 < amount:
                return False
        elif name in STANDARD or (detects_accelerator and name.startswith("accelerator_type:")):
            continue
        else:
            return False
    return True


def _detects_accelerator(data: dict[str, Any]) -> bool:
    """Fixed clusters (local provider) and KubeRay pods get accelerator_type from Ray's own detection."""
    return data.get("kind") in ("RayJob", "RayCluster") or not data.get("available_node_types")


def unsatisfiable(config: dict[str, Any], spec: dict[str, Any] | str | Path) -> list[str]:
    """One message per request that no node type of ``spec`` can hold; empty when all fit."""
    data = read_yaml(spec) if isinstance(spec, str | Path) else spec
    types = node_types(data)
    auto = _detects_accelerator(data)
    label = str(spec) if isinstance(spec, str | Path) else "the cluster spec"
    offered = "; ".join(f"{name}: {_fmt(res)}" for name, res in types.items()) or "none"
    problems = []
    for req in find_requests(config):
        if any(fits(req.bundle, res, auto) for res in types.values()):
            continue
        missing = sorted(k for k in req.bundle if k not in STANDARD and not any(k in r for r in types.values())
                         and not (auto and k.startswith("accelerator_type:")))
        why = (f"no node type provides {', '.join(missing)}" if missing
               else "no single node type has enough of it")
        problems.append(f"{req.path}: asks for {_fmt(req.bundle)}, but {why} in {label} (node types: {offered})")
    return problems


def check_resources(config: dict[str, Any], spec: dict[str, Any] | str | Path) -> None:
    """Raise ResourceMismatch naming every field whose request no node type of ``spec`` can hold."""
    problems = unsatisfiable(config, spec)
    if problems:
        raise ResourceMismatch("\n".join(problems))


def _fmt(res: dict[str, float]) -> str:
    items = ", ".join(f"{k}: {int(v) if float(v).is_integer() else v}" for k, v in sorted(res.items()))
    return "{" + items + "}"


def declares(spec: dict[str, Any] | str | Path, resource: str) -> bool:
    """Whether any node type of ``spec`` declares ``resource`` (e.g. 'driver' for job drivers)."""
    return any(resource in res for res in node_types(spec).values())


__all__ = [
    "ResourceMismatch",
    "ResourceRequest",
    "check_resources",
    "declares",
    "find_requests",
    "fits",
    "node_types",
    "unsatisfiable",
]
