"""Autoscaling, simulated for real: cluster/fake-multinode.yaml on Ray's fake multi-node provider.

The head runs the real autoscaler (monitor) with the spec; the fake provider launches each "node" as one more local
raylet. A job submitted through `reasonembed submit` runs a stage that asks for the GPU-role resource {gpu_infer: 1}
(no node has it at first), and the test shows, from Ray's own state API and autoscaler log:

1. the autoscaler launching exactly a node of type gpu-infer for it, and the stage running there;
2. the job finishing;
3. that node being terminated once idle for idle_timeout_minutes (0.1 min here).

Small for a 2-core machine: 1-CPU nodes, 128 MiB object stores, one worker node at a time. Everything listens on
127.0.0.1 and is stopped process by process (never `ray stop`, which would end other people's clusters).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml
from job_scripts import job_script

from reasonembed.config.submit import SubmitOptions
from reasonembed.local_head import LocalHead
from reasonembed.submit import submit

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "cluster" / "fake-multinode.yaml"

PROBE = job_script(
    "Tests-only stage: run one task with the config's ray options and record where it ran.",
    """
    import json, os
    import ray

    ray.init()
    stage = cfg["stage"]

    @ray.remote(num_cpus=stage["num_cpus"], resources=stage["resources"])
    def probe():
        return {"node_id": ray.get_runtime_context().get_node_id(),
                "node_type": os.environ.get("RAY_NODE_TYPE_NAME")}

    where = ray.get(probe.remote(), timeout=240)
    where["driver_node_id"] = ray.get_runtime_context().get_node_id()
    os.makedirs(cfg["out"], exist_ok=True)
    with open(os.path.join(cfg["out"], "probe.json"), "w") as f:
        json.dump(where, f)
    print("PROBE " + json.dumps(where), flush=True)
    """,
)


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 1.0):
    """Poll until predicate() is truthy; fail naming ``what`` after ``timeout_s`` (a deadline, not a timing check)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.mark.slow
def test_gpu_role_stage_scales_a_node_up_and_idle_removes_it(tmp_path):
    from ray.util.state import list_nodes

    spec = yaml.safe_load(SPEC.read_text())

    wd = tmp_path / "wd"
    (wd / "jobs").mkdir(parents=True)
    (wd / "configs").mkdir()
    (wd / "jobs" / "probe.py").write_text(PROBE)
    out = tmp_path / "runs"
    (wd / "configs" / "probe.yaml").write_text(yaml.safe_dump({
        "run_id": "autoscale", "out": str(out),
        "stage": {"num_cpus": 1, "resources": {"gpu_infer": 1}},
    }))

    # LocalHead points the spec's provider.gcs_address at the free port it picks, so worker raylets join this head.
    head = LocalHead.start(
        num_cpus=1, object_store_mb=128, autoscaling_config=spec,
        env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
    )
    spec_path = head.temp_dir / "autoscaling.yaml"
    try:
        assert yaml.safe_load(spec_path.read_text())["provider"]["gcs_address"] == head.address
        nodes = list_nodes(address=head.dashboard_url)
        assert len(nodes) == 1 and not any(n.resources_total.get("gpu_infer") for n in nodes)

        lines: list[str] = []
        # The driver stays on the head (no `driver` resource requested); the spec check runs against the same YAML.
        opts = SubmitOptions(working_dir=str(wd), entrypoint_resources={}, poll_interval_s=1.0,
                             address=head.dashboard_url, retries=0, cluster_spec=str(spec_path))
        result = submit("probe", wd / "configs" / "probe.yaml", options=opts, echo=lines.append)
        assert result.status == "SUCCEEDED"
        where = json.loads((out / "probe.json").read_text())

        # 1. The stage ran on a node the autoscaler launched for it, of the gpu-infer type.
        assert where["node_type"] == "gpu-infer"
        nodes = {n.node_id: n for n in list_nodes(address=head.dashboard_url, detail=True)}
        assert len(nodes) == 2
        gpu_node = nodes[where["node_id"]]
        assert gpu_node.resources_total.get("gpu_infer") == 1
        assert where["driver_node_id"] != where["node_id"]
        assert nodes[where["driver_node_id"]].is_head_node
        # The autoscaler's own record (NodeLauncher in monitor.log): one launch, of the role that was asked for.
        monitor_log = head.temp_dir / "session_latest" / "logs" / "monitor.log"
        launches = re.findall(r"Launching (\d+) nodes, type ([\w.-]+)\.", monitor_log.read_text())
        assert launches == [("1", "gpu-infer")]

        # 2. The job finished (status above) and its driver log came back through `submit`.
        assert any(line.startswith("PROBE ") for line in lines)

        # 3. Idle for idle_timeout_minutes: the autoscaler terminates the gpu-infer node.
        def gpu_node_gone():
            states = {n.node_id: n.state for n in list_nodes(address=head.dashboard_url, detail=True)}
            return states.get(where["node_id"]) == "DEAD"

        wait_for(gpu_node_gone, 180, "the idle gpu-infer node to be removed")
        # ...and says why: the fake provider's node ids are the Ray node ids, so the line names this very node.
        assert f"Terminating the node with id {where['node_id']} and ip {where['node_id']}. (idle)" in (
            monitor_log.read_text()
        )
        alive = [n for n in list_nodes(address=head.dashboard_url) if n.state == "ALIVE"]
        assert len(alive) == 1 and alive[0].is_head_node
    finally:
        head.stop()
    assert head.processes() == []
