"""`physflow submit --kubernetes`: the RayJob it creates validates strictly against the KubeRay
CRD and passes the operator's rules; its API calls go to a small local HTTP server standing
in for the Kubernetes API (no API server can run here), which records them."""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from flows.submit_kubernetes import KubeRayJobs
from infra.k8s_check import (
    OVERLAYS,
    SCHEMAS,
    kuberay_rules,
    load_crd_schemas,
    network_rules,
    pod_rules,
    pod_specs,
    ray_rules,
    render,
)
from infra.k8s_check import schema_errors as crd_errors

runner = CliRunner()
NS = "physflow"
RAYJOBS = f"/apis/ray.io/v1/namespaces/{NS}/rayjobs"
SPEC = """
name: k8s-tiny
samples: 6
samples_per_task: 3
test_fraction: 0.2
simulation: {pde: diffusion-sorption, nx: 32, nt: 6, t_end: 50.0}
"""


class KubernetesStandIn(ThreadingHTTPServer):
    """Answers the calls `KubeRayJobs` makes, as an API server with KubeRay would, and
    records each (method, path, query, body). A RayJob advances one phase per read."""

    daemon_threads = True

    def __init__(self, outcome: str = "SUCCEEDED"):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.calls: list[tuple[str, str, dict, dict | None]] = []
        self.objects: dict[str, dict] = {}
        self.reads: dict[str, int] = {}
        self.outcome = outcome
        self.first_line_shown = threading.Event()
        self.pods_gone = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


PHASES = [("Initializing", ""), ("Running", "RUNNING")]


class _Handler(BaseHTTPRequestHandler):
    server: KubernetesStandIn

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _reply(self, code: int, body: dict | str) -> None:
        data = body if isinstance(body, str) else json.dumps(body)
        self.send_response(code)
        self.send_header(
            "Content-Type", "text/plain" if isinstance(body, str) else "application/json"
        )
        self.send_header("Content-Length", str(len(data.encode())))
        self.end_headers()
        self.wfile.write(data.encode())

    def _record(self) -> tuple[str, dict, dict | None]:
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        query = parse_qs(url.query)
        self.server.calls.append((self.command, url.path, query, body))
        return url.path, query, body

    def do_POST(self) -> None:
        path, _, body = self._record()
        name = body["metadata"]["name"]
        key = f"{path}/{name}"
        if key in self.server.objects:
            return self._reply(409, {"kind": "Status", "reason": "AlreadyExists", "code": 409})
        body["metadata"].update(uid=f"uid-{name}", namespace=NS)
        self.server.objects[key] = body
        self._reply(201, body)

    def do_GET(self) -> None:
        path, query, _ = self._record()
        if path == RAYJOBS:
            items = [o for k, o in self.server.objects.items() if k.startswith(RAYJOBS)]
            return self._reply(200, {"kind": "RayJobList", "items": items})
        if path.startswith(RAYJOBS + "/"):
            obj = self.server.objects.get(path)
            if obj is None:
                return self._reply(404, {"kind": "Status", "reason": "NotFound", "code": 404})
            n = self.server.reads[path] = self.server.reads.get(path, 0) + 1
            if n <= len(PHASES):
                deployment, job = PHASES[n - 1]
            else:
                deployment = "Complete" if self.server.outcome == "SUCCEEDED" else "Failed"
                job = self.server.outcome
            obj["status"] = {"jobDeploymentStatus": deployment, "jobStatus": job,
                             "startTime": "2026-01-01T00:00:00Z"}  # fmt: skip
            return self._reply(200, obj)
        if path == f"/api/v1/namespaces/{NS}/pods":
            job = query["labelSelector"][0].split("=", 1)[1]
            pod = {"metadata": {"name": f"{job}-submitter", "namespace": NS},
                   "status": {"phase": "Running"}}  # fmt: skip
            pods = [] if self.server.pods_gone else [pod]
            return self._reply(200, {"kind": "PodList", "apiVersion": "v1", "items": pods})
        if path.endswith("/log") and query.get("follow") == ["true"]:
            # streamed: the second line only once the client has shown the first
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"training: step 1\n")
            self.wfile.flush()
            seen = self.server.first_line_shown.wait(10)
            self.wfile.write(f"training: step 2 (step 1 shown before: {seen})\n".encode())
            self.close_connection = True
            return None
        if path.endswith("/log"):
            return self._reply(200, "published k8s-tiny v1: 6 samples\n")
        self._reply(404, {"kind": "Status", "code": 404})

    def do_DELETE(self) -> None:
        path, _, _ = self._record()
        self.server.objects.pop(path, None)
        self._reply(200, {"kind": "Status", "status": "Success"})


@pytest.fixture
def standin(tmp_path, monkeypatch, request):
    server = KubernetesStandIn(getattr(request, "param", "SUCCEEDED"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "standin",
        "clusters": [{"name": "standin", "cluster": {"server": server.url}}],
        "users": [{"name": "me", "user": {"token": "standin-token"}}],
        "contexts": [{"name": "standin",
                      "context": {"cluster": "standin", "user": "me", "namespace": NS}}],
    }))  # fmt: skip
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("PHYSFLOW_IMAGE", "registry.example.com/physflow:0.1.0-ray2.60.0")
    monkeypatch.setattr(KubeRayJobs, "poll_s", 0.01)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(SPEC)
    return path


def physflow(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_submit_follow_creates_a_valid_rayjob_follows_it_and_cleans_up(standin, spec,
                                                                     monkeypatch):  # fmt: skip
    from flows import submit_cli

    shown = submit_cli._write

    def write(text: str) -> None:
        shown(text)
        if "step 1" in text:
            standin.first_line_shown.set()

    monkeypatch.setattr(submit_cli, "_write", write)
    result = physflow("submit", spec, "--kubernetes", "--follow", "--gpu-workers", "2",
                      "--env", "PHYSFLOW_STORAGE=s3://physflow/trial")  # fmt: skip
    assert result.exit_code == 0, result.output
    # the log streamed as the job writes it, not all at once when it has ended
    assert "training: step 2 (step 1 shown before: True)" in result.output
    assert "RayJob and its cluster removed" in result.output

    methods = [(m, p) for m, p, _, _ in standin.calls]
    rayjob = next(b for m, p, _, b in standin.calls if m == "POST" and p == RAYJOBS)
    name = rayjob["metadata"]["name"]
    assert methods[0] == ("POST", RAYJOBS)
    assert methods[1] == ("POST", f"/api/v1/namespaces/{NS}/configmaps")
    assert methods[-1] == ("DELETE", f"{RAYJOBS}/{name}")

    # The RayJob: strictly valid for the CRD, nothing the operator refuses, secure pods.
    if SCHEMAS.is_dir():
        schema = load_crd_schemas(SCHEMAS)[("ray.io/v1", "RayJob")]
        body = {k: v for k, v in rayjob.items() if k != "status"}
        body["metadata"] = {
            k: v for k, v in body["metadata"].items() if k in ("name", "labels", "annotations")
        }
        assert crd_errors(body, schema) == []
    assert kuberay_rules(rayjob) == []
    assert all(pod_rules(pod) == [] for _, pod in pod_specs(rayjob))
    spec_ = rayjob["spec"]
    assert spec_["entrypoint"] == "physflow preprocess /etc/physflow/spec/spec.yaml"
    assert spec_["shutdownAfterJobFinishes"] and spec_["ttlSecondsAfterFinished"] > 0
    assert spec_["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    gpu = spec_["rayClusterSpec"]["workerGroupSpecs"][-1]
    assert gpu["replicas"] == 2
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = yaml.safe_load(spec_["runtimeEnvYAML"])["env_vars"]
    assert env["PHYSFLOW_STORAGE"] == "s3://physflow/trial"  # only what --env gave
    assert "MLFLOW_TRACKING_URI" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert spec_["metadata"]["physflow.spec_digest"]
    # the image's code runs: the image is recorded, not this checkout's digest or commit
    annotations = rayjob["metadata"]["annotations"]
    assert annotations["physflow.io/image"] == spec_["metadata"]["physflow.image"]
    assert not {"physflow.io/code-digest", "physflow.io/git-commit"} & annotations.keys()
    assert "physflow.code_digest" not in spec_["metadata"]
    # a cluster that is not autoscaled makes no Kubernetes API calls: no token mounted
    assert all(pod["automountServiceAccountToken"] is False for _, pod in pod_specs(rayjob))
    # every pod mounts what the static RayCluster's head mounts (and the spec): the root is
    # read-only, so /tmp, ~/.cache (matplotlib's, torch's) and /dev/shm are volumes
    static = next(
        d for d in yaml.safe_load_all(open("k8s/base/raycluster.yaml")) if d["kind"] == "RayCluster"
    )
    head = static["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    wanted = {m["mountPath"] for m in head["volumeMounts"]}
    for path, pod in pod_specs(rayjob):
        if path != "spec.submitterPodTemplate":
            assert wanted <= {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}

    # Its submitter pod is the RayJob templates' (k8s/base/rayjobs.yaml), and the namespace's
    # NetworkPolicies let it reach its head's job API and DNS.
    rendered = render(OVERLAYS / "dev")
    template = next(d for d in rendered if d["kind"] == "RayJob")["spec"]["submitterPodTemplate"]
    mine = copy.deepcopy(spec_["submitterPodTemplate"])
    assert mine["metadata"]["labels"].pop("physflow.io/job") == "preprocess"
    mine["spec"]["containers"][0]["image"] = template["spec"]["containers"][0]["image"]
    assert mine == template
    policies = [d for d in rendered if d["kind"] == "NetworkPolicy"]
    placed = dict(rayjob, metadata=dict(rayjob["metadata"], namespace="physflow"))
    assert network_rules([placed, *policies]) == []

    # The spec travels in a ConfigMap that its RayJob owns.
    cm = next(b for m, p, _, b in standin.calls if p.endswith("/configmaps"))
    assert cm["metadata"]["ownerReferences"][0]["uid"] == f"uid-{name}"
    assert yaml.safe_load(cm["data"]["spec.yaml"])["name"] == "k8s-tiny"


@pytest.mark.parametrize("standin", ["FAILED"], indirect=True)
def test_a_failed_rayjob_makes_follow_exit_1(standin, spec):
    result = physflow("submit", spec, "--kubernetes", "--follow")
    assert result.exit_code == 1, result.output
    assert "failed" in result.output and "Traceback" not in result.output


def test_status_logs_jobs_stop_and_duplicates(standin, spec):
    first = physflow("submit", spec, "--kubernetes")
    assert first.exit_code == 0, first.output
    name = first.output.split("submitted ", 1)[1].split()[0]
    again = physflow("submit", spec, "--kubernetes")
    assert again.exit_code == 2 and f"RayJob {name} already exists" in again.output

    status = physflow("status", name, "--kubernetes")
    assert status.exit_code == 0 and name in status.output
    assert "physflow.spec_digest" in status.output
    listed = physflow("jobs", "--kubernetes")
    assert listed.exit_code == 0 and name in listed.output
    logs = physflow("logs", name, "--kubernetes")
    assert logs.exit_code == 0 and "published k8s-tiny" in logs.output
    standin.pods_gone = True  # KubeRay removed the submitter pod, and its log with it
    logs = physflow("logs", name, "--kubernetes")
    assert logs.exit_code == 0 and f"note: no output: {name}'s submitter pod" in logs.output
    standin.pods_gone = False
    stopped = physflow("stop", name, "--kubernetes")
    assert stopped.exit_code == 0 and f"stopping {name}" in stopped.output
    assert ("DELETE", f"{RAYJOBS}/{name}") in [(m, p) for m, p, _, _ in standin.calls]
    gone = physflow("status", name, "--kubernetes")
    assert gone.exit_code == 2 and f"no RayJob {name}" in gone.output


def test_no_image_and_no_cluster_are_one_line_errors(standin, spec, monkeypatch, tmp_path):
    monkeypatch.delenv("PHYSFLOW_IMAGE")
    result = physflow("submit", spec, "--kubernetes")
    assert result.exit_code == 2 and "--image: which physflow image" in result.output
    for image in ("reg/physflow:latest", "reg/physflow:0.1.0-ray2.59.0", "reg/physflow"):
        result = physflow("submit", spec, "--kubernetes", "--image", image)
        assert result.exit_code == 2 and f"--image {image}: its tag does not carry Ray 2.60.0" in (
            result.output
        ), result.output
    standin.shutdown()
    standin.server_close()
    result = physflow("jobs", "--kubernetes")
    assert result.exit_code == 2, result.output
    assert "cannot connect" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("config", "driver_gpu"),
    [("configs/ds-moe.yaml", True), ("configs/nas-fno.yaml", True),
     ("configs/pbt-ds-moe.yaml", False)],
)  # fmt: skip
def test_a_driver_that_trains_gets_a_gpu_worker_of_its_own(config, driver_gpu):
    """train and nas train their network in the job's driver: with GPU workers, the
    driver gets one more for itself, and the experts are told to leave it alone. A PBT
    driver trains nothing (its members are actors)."""
    from actors.experts import ENTRYPOINT_GPUS_VAR
    from flows.submit import prepare
    from flows.submit_kubernetes import rayjob_manifest

    rayjob = rayjob_manifest(prepare(config), "pf-x", "reg/physflow:0.1.0-ray2.60.0",
                             gpu_workers=4)  # fmt: skip
    spec_ = rayjob["spec"]
    gpu = spec_["rayClusterSpec"]["workerGroupSpecs"][-1]
    env = yaml.safe_load(spec_["runtimeEnvYAML"])["env_vars"]
    assert gpu["replicas"] == 4 + driver_gpu
    assert spec_.get("entrypointNumGpus", 0) == driver_gpu
    assert env.get(ENTRYPOINT_GPUS_VAR) == ("1" if driver_gpu else None)
    cpu_only = rayjob_manifest(prepare(config), "pf-x", "reg/physflow:0.1.0-ray2.60.0")
    assert "entrypointNumGpus" not in cpu_only["spec"]
    # without GPUs, on a CPU worker: the head takes no work
    assert cpu_only["spec"].get("entrypointNumCpus", 0) == driver_gpu
    for manifest in (rayjob, cpu_only):
        # the driver where it can train, the object store in memory (/dev/shm)
        assert kuberay_rules(manifest) == [] and ray_rules(manifest) == []
        if SCHEMAS.is_dir():
            schema = load_crd_schemas(SCHEMAS)[("ray.io/v1", "RayJob")]
            assert crd_errors({k: v for k, v in manifest.items() if k != "status"}, schema) == []
