"""Autoscaled pools through the real kopf operator against kmock: the RayCluster's worker group replicas follow
the pool controller's report (served here by a stand-in on loopback, as the head pod serves it), the status shows
desired vs ready groups and the last decision, each decision is an Event, and bad autoscaling specs are refused
naming the field."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.kmock_cluster import Cluster, running_cluster

from k2serve.operator import kube as k
from k2serve.operator.spec import GROUP, PLURAL, VERSION
from k2serve.scaling import PoolScaling, ScaleDecision, ScalingReport

pytestmark = pytest.mark.timeout(120)
NAME = "scaled"
K2D = k.Ref(GROUP, VERSION, PLURAL, "K2Deployment")
SAMPLE = yaml.safe_load((Path(__file__).resolve().parents[2] / "manifests/samples/tiny-k2.yaml").read_text())
NS = SAMPLE["metadata"]["namespace"]


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (got := probe()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)
    return got


def autoscaled_cr(decode: dict[str, Any]) -> dict[str, Any]:
    cr = copy.deepcopy(SAMPLE)
    cr["metadata"]["name"] = NAME
    cr["spec"]["decode"] = {**cr["spec"].get("decode", {}), **decode}
    return cr


class Controller:
    """A stand-in pool controller: serves `report` (None: 404, not up yet) at /<namespace>/<ray cluster>."""

    def __init__(self) -> None:
        self.report: ScalingReport | None = None
        self.paths: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.paths.append(self.path)
                body = owner.report.model_dump_json().encode() if owner.report is not None else b""
                self.send_response(200 if owner.report is not None else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def decide(self, seq: int, before: int, after: int, draining: int = 0, surplus: tuple[str, ...] = ()) -> None:
        last = ScaleDecision(pool="decode", at=f"2026-01-01T00:00:{seq:02d}Z", seq=seq, from_groups=before,
                             to_groups=after, signal="queue_depth", reason=f"queue_depth test {seq}")
        self.report = ScalingReport(pools={"decode": PoolScaling(desired=after, ready=before, draining=draining,
                                                                 surplus_pods=list(surplus), last=last)})


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Controller]]:
    stand_in = Controller()
    url = f"http://127.0.0.1:{stand_in.server.server_port}/{{namespace}}/{{ray}}"
    workdir: Path = tmp_path_factory.mktemp("kube")
    try:
        with running_cluster(True, workdir, operator_args=("--scaling-url", url)) as cluster:
            yield cluster, stand_in
    finally:
        stand_in.server.shutdown()


def decode_group(c: Cluster) -> dict[str, Any]:
    rc = c.kube.get(k.RAYCLUSTER, NS, f"{NAME}-ray") or {"spec": {"workerGroupSpecs": []}}
    return next((g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "decode-workers"), {})


def scaled_events(c: Cluster) -> list[str]:
    return [obj.raw["message"] for (res, _, _), obj in c.emulator.objects.items() if res.plural == "events"
            and obj.raw.get("reason") == "Scaled" and obj.raw.get("involvedObject", {}).get("name") == NAME]


def test_raycluster_replicas_follow_the_pool_controllers_decisions(scaled: tuple[Cluster, Controller]) -> None:
    c, stand_in = scaled
    # EP 2: every decode group is two worker pods.
    c.kube._call("POST", K2D.path(NS), body=autoscaled_cr(
        {"groups": 1, "expertParallel": 2, "autoscaling": {"minGroups": 1, "maxGroups": 3}}))
    # No report yet (the head pod is not up): the starting count, and the range for KubeRay.
    group = wait_for("the RayCluster", lambda: decode_group(c))
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 6)
    assert group["scaleStrategy"] == {"workersToDelete": []}
    wait_for("the operator asking the controller", lambda: f"/{NS}/{NAME}-ray" in stand_in.paths)

    stand_in.decide(1, 1, 2)  # scale-up
    wait_for("decode replicas 4", lambda: decode_group(c).get("replicas") == 4)
    cr = wait_for("status with the decision", lambda: (o := c.kube.get(K2D, NS, NAME)) and
                  o.get("status", {}).get("decode", {}).get("lastScaleDecision") and o)
    status = cr["status"]["decode"]
    assert (status["desired"], status["readiness"]) == (2, "0/2")
    assert status["lastScaleDecision"] == {"at": "2026-01-01T00:00:01Z", "fromGroups": 1, "toGroups": 2,
                                           "signal": "queue_depth", "reason": "queue_depth test 1"}
    wait_for("the Event of the decision", lambda: scaled_events(c) == [
        "decode: 1 -> 2 groups (queue_depth): queue_depth test 1"])

    stand_in.decide(2, 2, 1, draining=1)  # scale-down decided: the drained group keeps its pods meanwhile
    wait_for("the second Event", lambda: len(scaled_events(c)) == 2)
    assert decode_group(c)["replicas"] == 4
    stand_in.decide(2, 2, 1, draining=0, surplus=("scaled-decode-2", "scaled-decode-3"))  # removed: its pods go,
    wait_for("decode replicas 2", lambda: decode_group(c).get("replicas") == 2)  # exactly the idle ones
    assert decode_group(c)["scaleStrategy"] == {"workersToDelete": ["scaled-decode-2", "scaled-decode-3"]}
    assert scaled_events(c)[1] == "decode: 2 -> 1 groups (queue_depth): queue_depth test 2"
    assert len(scaled_events(c)) == 2  # one Event per decision, however many reconciles saw it

    stand_in.decide(3, 1, 9)  # a report past maxGroups is clamped to the spec's range
    wait_for("decode replicas 6", lambda: decode_group(c).get("replicas") == 6)
    c.kube.delete(K2D, NS, NAME)
    wait_for("CR gone", lambda: c.kube.get(K2D, NS, NAME) is None)


@pytest.mark.parametrize(("decode", "field"), [
    ({"autoscaling": {"minGroups": 3, "maxGroups": 2}}, "spec.decode.autoscaling.minGroups"),
    ({"autoscaling": {"maxGroups": -1}}, "spec.decode.autoscaling.maxGroups"),
    ({"autoscaling": {"targetKvUse": 1.5}}, "spec.decode.autoscaling.targetKvUse"),
])
def test_bad_autoscaling_specs_are_refused_naming_the_field(scaled: tuple[Cluster, Controller], decode: dict[str, Any],
                                                            field: str) -> None:
    c, _ = scaled
    cr = autoscaled_cr(decode)
    cr["metadata"]["name"] = name = "bad-" + field.rsplit(".", 1)[-1].lower()
    c.kube._call("POST", K2D.path(NS), body=cr)
    obj = wait_for("Invalid phase", lambda: (o := c.kube.get(K2D, NS, name)) and
                   o.get("status", {}).get("phase") == "Invalid" and o)
    degraded = next(x for x in obj["status"]["conditions"] if x["type"] == "Degraded")
    assert field in degraded["message"] and degraded["reason"] == "InvalidSpec"
    assert c.kube.get(k.RAYCLUSTER, NS, f"{name}-ray") is None  # nothing rendered from a bad spec
    c.kube.delete(K2D, NS, name)
    wait_for("CR gone", lambda: c.kube.get(K2D, NS, name) is None)
