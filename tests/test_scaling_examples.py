"""The scale-out examples: examples/scaled_flow.py can run on several workers, and the
Kubernetes manifests in examples/kubernetes/ fit it and each other.

No Kubernetes schema validator is among the dev dependencies, so the manifests are
checked structurally (parsed with strictyaml, pinned through pyiceberg): the fields
Kubernetes and KEDA require, the container's command parsed by sluiceway's own argument
parser, and every value that must agree across the files and the flow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import strictyaml

from sluiceway.cli import build_parser, load_flow
from sluiceway.scaleout.checks import check_scalable

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "examples" / "kubernetes"
PARTITIONS = 12  # of "orders", as the manifests' comments say


def _load(name: str) -> Any:
    return strictyaml.dirty_load((KUBE / name).read_text(), allow_flow_style=True).data


@pytest.fixture
def deployment() -> Any:
    return _load("deployment.yaml")


@pytest.fixture
def scaled() -> Any:
    return _load("keda-scaledobject.yaml")


def test_the_deployment_runs_the_example_flow_as_workers(
    deployment: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert deployment["apiVersion"] == "apps/v1"
    assert deployment["kind"] == "Deployment"
    spec = deployment["spec"]
    assert int(spec["replicas"]) >= 1
    template = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    pod = template["spec"]
    [container] = pod["containers"]
    command = container["command"]
    assert command[:2] == ["sluiceway", "run"]
    args = build_parser().parse_args(command[1:])  # the real parser: options exist, typed
    assert args.workers == 1  # one worker per pod: Kubernetes makes the replicas
    # SIGTERM drains within the grace period; Kubernetes must wait longer before SIGKILL.
    assert int(pod["terminationGracePeriodSeconds"]) > args.grace_period
    ports = {p["name"]: int(p["containerPort"]) for p in container["ports"]}
    annotations = template["metadata"]["annotations"]
    assert ports["metrics"] == args.metrics_port == int(annotations["prometheus.io/port"])
    env = {e["name"]: e for e in container["env"]}
    assert env["SLUICEWAY_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # The target is a file of this repository (the image's working directory) that the
    # scale-out checks accept for as many workers as the scaler may start.
    monkeypatch.chdir(ROOT)
    flow = load_flow(args.target)
    check_scalable(flow, PARTITIONS, checkpoint_dir=args.checkpoint_dir is not None)


def test_keda_scales_that_deployment_on_the_flows_consumer_lag(
    deployment: Any, scaled: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["kind"] == "ScaledObject"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    low, high = int(spec["minReplicaCount"]), int(spec["maxReplicaCount"])
    assert 1 <= low <= high <= PARTITIONS  # a worker without a partition idles
    [trigger] = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert int(meta["lagThreshold"]) > 0
    assert meta["offsetResetPolicy"] in ("earliest", "latest")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert meta["bootstrapServers"] == env["KAFKA_BOOTSTRAP"]
    # The group and topic KEDA watches are the ones the flow reads.
    monkeypatch.chdir(ROOT)
    target = container["command"][2]
    flow = load_flow(target)
    [source] = [n.spec.source for n in flow.nodes if n.kind == "source"]  # type: ignore[attr-defined]
    assert source.describe() == f"Kafka({meta['topic']}, group={meta['consumerGroup']})"
