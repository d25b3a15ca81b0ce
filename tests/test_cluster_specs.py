"""Every cluster spec in cluster/ is valid for the tool that reads it, and says what the docs say it says.

Launcher YAMLs are checked with Ray's own validator (``ray.autoscaler._private.util.validate_config`` against the
``ray-schema.json`` shipped in the ray wheel), after the same default filling `ray up` does (``prepare_config``).
The KubeRay RayJob has no schema in any installed package; it is checked against the fields the RayJob/RayCluster
CRDs require (KubeRay ray.io/v1 types) and the string-typed maps that kubectl would otherwise reject.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from reasonembed.cluster_spec import node_types

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
LAUNCHER_SPECS = ["aws-gpu.yaml", "local.yaml", "fake-multinode.yaml"]
ROLE_RESOURCES = {"driver", "gpu_infer", "gpu_train"}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` / the autoscaler does: fill defaults for the provider, then validate against the schema.

    The ray wheel does not ship the fake_multinode provider's defaults file, so that spec is written out in full
    and validated as is, which is also what the autoscaler monitor does with the file given to
    ``ray start --autoscaling-config``.
    """
    config = copy.deepcopy(config)
    if config["provider"]["type"] != "fake_multinode":
        config = prepare_config(config)
    validate_config(config)
    return config


@pytest.mark.parametrize("name", LAUNCHER_SPECS)
def test_launcher_spec_passes_rays_own_validation(name):
    prepared = ray_validate(load(name))
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "fake-multinode.yaml"])
def test_validator_rejects_a_broken_copy(name):
    """The validation above has teeth: a misspelt node-type key and a fractional resource are both refused."""
    bad = load(name)
    worker = next(k for k in bad["available_node_types"] if k != bad["head_node_type"])
    bad["available_node_types"][worker]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        ray_validate(bad)
    bad = load(name)
    bad["available_node_types"][worker]["resources"]["CPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(bad)


def test_aws_images_are_pinned_to_the_installed_ray():
    docker = load("aws-gpu.yaml")["docker"]
    images = [docker["image"], docker["head_image"]]
    for image in images:
        repo, _, tag = image.partition(":")
        assert repo == "rayproject/ray"
        assert tag.startswith(f"{ray.__version__}-py311"), image
        assert "latest" not in tag


def test_aws_head_runs_no_work():
    cfg = load("aws-gpu.yaml")
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--num-cpus=0" in start
    assert "--dashboard-host=127.0.0.1" in start  # reached through `ray dashboard` (SSH), not the internet
    assert "GPU" not in head["resources"]


def test_aws_worker_roles():
    cfg = ray_validate(load("aws-gpu.yaml"))
    types = cfg["available_node_types"]
    assert set(types) == {"head", "cpu-worker", "gpu-infer", "gpu-train"}
    infer, train, cpu = types["gpu-infer"], types["gpu-train"], types["cpu-worker"]
    # Spot only where the stages are idempotent and resume by shard; training and drivers on demand.
    assert infer["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in train["node_config"]
    assert "InstanceMarketOptions" not in cpu["node_config"]
    assert train["resources"]["GPU"] == 8 and train["resources"]["gpu_train"] == 8
    assert infer["resources"]["gpu_infer"] == infer["resources"]["GPU"]
    assert cpu["resources"]["driver"] >= 1 and cpu["min_workers"] >= 1
    for name, t in types.items():
        if name != cfg["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"], name
    assert sum(t["max_workers"] for n, t in types.items() if n != "head") <= cfg["max_workers"]
    assert 0 < cfg["idle_timeout_minutes"] <= 30


def test_aws_installs_this_project_at_a_fixed_ref_with_the_gpu_extra():
    cfg = load("aws-gpu.yaml")
    cmds = " ".join(cfg["worker_setup_commands"] + cfg["setup_commands"])
    m = re.search(r'"reasonembed\[([a-z,]+)\] @ git\+https://\S+?\.git@([^"\s]+)"', cmds)
    assert m, cmds
    assert "gpu" in m.group(1).split(",")
    assert m.group(2) not in {"main", "master", "HEAD"}


def test_no_credentials_in_any_spec():
    """S3 comes from instance profiles / service accounts; no key material may be written into a spec."""
    for path in CLUSTER.glob("*.yaml"):
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), path
        assert not re.search(r"(?i)aws_(secret_)?access_key(_id)?\s*[:=]", text), path
    cfg = load("aws-gpu.yaml")
    for name in ("cpu-worker", "gpu-infer", "gpu-train"):
        assert cfg["available_node_types"][name]["node_config"]["IamInstanceProfile"]["Name"]


def test_local_spec_is_one_loopback_node():
    cfg = load("local.yaml")
    assert cfg["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--node-ip-address=127.0.0.1" in start and "--dashboard-host=127.0.0.1" in start
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in start
    assert "ray stop" not in start


def test_fake_cluster_mirrors_the_aws_roles_small():
    fake, aws = load("fake-multinode.yaml"), load("aws-gpu.yaml")
    assert fake["head_node_type"] == "ray.head.default"  # hard-coded by Ray's FakeMultiNodeProvider
    assert set(fake["available_node_types"]) - {"ray.head.default"} == set(aws["available_node_types"]) - {"head"}
    custom = {k for t in node_types(fake).values() for k in t} - {"CPU", "GPU", "object_store_memory"}
    assert custom == ROLE_RESOURCES
    for name, t in fake["available_node_types"].items():
        assert t["resources"]["CPU"] == 1, name  # sized for a 2-core machine
    assert fake["provider"]["gcs_address"].startswith("127.0.0.1:")


# ---- KubeRay RayJob -------------------------------------------------------------------------------------------


def _pod_containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_rayjob_has_the_fields_kuberay_requires():
    job = load("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])  # a DNS-1123 label
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python jobs/")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= {"working_dir", "pip", "py_modules", "env_vars", "excludes"}
    cluster = spec["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        assert isinstance(group["rayStartParams"], dict)
        # map[string]string in the CRD: a bare number or bool here fails `kubectl apply`.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
        containers = _pod_containers(group)
        assert containers and all(c.get("name") and c.get("image") for c in containers)
    names = [g["groupName"] for g in cluster["workerGroupSpecs"]]
    assert len(names) == len(set(names))
    for g in cluster["workerGroupSpecs"]:
        assert isinstance(g["minReplicas"], int) and isinstance(g["maxReplicas"], int)
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
    assert isinstance(cluster["autoscalerOptions"]["idleTimeoutSeconds"], int)
    json.loads(spec["entrypointResources"])  # a JSON string in the CRD, not a mapping


def test_rayjob_pins_ray_and_matches_the_aws_roles():
    job = load("kuberay-rayjob.yaml")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for c in _pod_containers(group):
            assert c["image"].startswith(f"rayproject/ray:{ray.__version__}-"), c["image"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    types = node_types(CLUSTER / "kuberay-rayjob.yaml")
    assert types["gpu-infer"]["gpu_infer"] == types["gpu-infer"]["GPU"] == 8
    assert {k for t in types.values() for k in t} - {"CPU", "GPU"} == ROLE_RESOURCES
    assert json.loads(job["spec"]["entrypointResources"]) == {"driver": 1}
