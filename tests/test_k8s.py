"""`make k8s-check` on the real overlays (everything passes) and on deliberately broken
manifests (each mistake is caught, by the check meant to catch it)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra import k8s_check
from infra.k8s_check import (
    OVERLAYS,
    SCHEMAS,
    allowed,
    check,
    check_documents,
    image_matches_ray,
    load_crd_schemas,
    quantity,
    render,
)

FIXTURES = Path(__file__).parent / "k8s_fixtures"
CHECKOV = os.environ.get("CHECKOV") or shutil.which(
    "checkov", path=str(Path(__file__).parents[1] / ".venv-checkov" / "bin")
)
needs_schemas = pytest.mark.skipif(not SCHEMAS.is_dir(), reason=f"no CRD schemas at {SCHEMAS}")


@pytest.fixture(scope="module")
def schemas():
    return load_crd_schemas(SCHEMAS) if SCHEMAS.is_dir() else None


@pytest.fixture(scope="module")
def gpu_docs():
    return render(OVERLAYS / "gpu")


def overlays() -> list[Path]:
    return sorted(p for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").is_file())


def test_every_overlay_passes_every_offline_check():
    report = check(overlays(), SCHEMAS, checkov=None)
    assert [str(f) for f in report.failures] == []
    assert report.overlays == ["dev", "gpu"] and report.manifests >= 50
    assert "kubernetes-validate --strict" in report.checks and "hadolint" in report.checks
    if SCHEMAS.is_dir():
        assert "CRD schemas (strict)" in report.checks


@pytest.mark.skipif(CHECKOV is None, reason="checkov lives in its own venv (make k8s-check)")
def test_checkov_passes_with_only_the_documented_skips():
    report = check(overlays(), None, checkov=CHECKOV, dockerfile=None)
    assert [str(f) for f in report.failures] == []
    assert set(report.skips) == set(k8s_check.CHECKOV_SKIPS)
    assert all(len(reason) > 40 for reason in report.skips.values())


def test_the_broken_overlay_fails_on_each_mistake():
    report = check([FIXTURES / "broken"], SCHEMAS, checkov=None, dockerfile=None)
    found = [str(f) for f in report.failures]
    if SCHEMAS.is_dir():
        assert any("'maxReplica' was unexpected" in f for f in found), found
    assert any("env POSTGRES_PASSWORD is inlined" in f for f in found), found
    assert any("ray-worker: no cpu limit" in f for f in found), found


def test_the_command_exits_1_on_a_broken_overlay(capsys):
    code = k8s_check.main(["--overlays", str(FIXTURES), "--dockerfile", os.devnull])
    out = capsys.readouterr().out
    assert code == 1
    assert '"failures": ' in out.splitlines()[-1]


def _one(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _broken(docs, kind, name, change):
    docs = copy.deepcopy(docs)
    change(_one(docs, kind, name))
    return docs


def _group(doc, name):
    """A Ray group of a RayCluster or of a RayJob's cluster: "head" or a worker group's name."""
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"]
    if name == "head":
        return spec["headGroupSpec"]
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == name)


def _volume(group, name):
    return next(v for v in group["template"]["spec"]["volumes"] if v["name"] == name)


def _resources(group):
    return group["template"]["spec"]["containers"][0]["resources"]


@needs_schemas
@pytest.mark.parametrize(
    ("kind", "name", "change", "expected"),
    [
        # A wrong field, in a built-in kind and in custom resources.
        (
            "Deployment",
            "physflow-mlflow",
            lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicys="x"),
            "[kubernetes-validate]",
        ),
        (
            "DaskJob",
            "physflow-preprocess",
            lambda d: d["spec"]["cluster"]["spec"]["worker"].update(replica=2),
            "'replica' was unexpected",
        ),
        (
            "RayJob",
            "physflow-train",
            lambda d: d["spec"].update(shutdownAfterJobFinish=True),
            "'shutdownAfterJobFinish' was unexpected",
        ),
        # What the KubeRay operator refuses, that no schema says.
        (
            "RayJob",
            "physflow-pbt",
            lambda d: d["spec"].update(submissionMode="K8sMode"),
            "submissionMode 'K8sMode': not one of",
        ),
        (
            "RayJob",
            "physflow-nas",
            lambda d: d["spec"].update(shutdownAfterJobFinishes=False, suspend=False),
            "ttlSecondsAfterFinished needs shutdownAfterJobFinishes",
        ),
        (
            "RayCluster",
            "physflow",
            lambda d: d["spec"].update(rayVersion="2.59.0"),
            "does not carry rayVersion 2.59.0",
        ),
        (
            "RayCluster",
            "physflow",
            lambda d: d["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0][
                "resources"
            ]["limits"].pop("nvidia.com/gpu"),
            "gpu: a GPU group without nvidia.com/gpu limits",
        ),
        (
            "RayCluster",
            "physflow",
            lambda d: d["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
            "head: service must be ClusterIP",
        ),
        (
            "RayCluster",
            "physflow",
            lambda d: d["spec"].pop("authOptions"),
            "authOptions.mode must be token",
        ),
        # The submitter pod: KubeRay's default would be refused; ours must be let through.
        (
            "RayJob",
            "physflow-train",
            lambda d: d["spec"].pop("submitterPodTemplate"),
            "K8sJobMode without submitterPodTemplate",
        ),
        (
            "RayJob",
            "physflow-pbt",
            lambda d: d["spec"]["submitterPodTemplate"]["spec"].update(restartPolicy="Always"),
            "restartPolicy 'Always'; a Job's pods need Never or OnFailure",
        ),
        (
            "RayJob",
            "physflow-nas",
            lambda d: d["spec"]["submitterPodTemplate"]["spec"]["containers"][0][
                "securityContext"
            ].pop("allowPrivilegeEscalation"),
            "(spec.submitterPodTemplate)",
        ),
        (
            "RayJob",
            "physflow-nas",
            lambda d: d["spec"]["submitterPodTemplate"]["metadata"]["labels"].pop(
                "physflow.io/ray-client"
            ),
            "NetworkPolicies stop RayJob/physflow-nas: its submitter pod",
        ),
        (
            "NetworkPolicy",
            "allow-dns",
            lambda d: d["spec"]["egress"][0]["ports"].pop(0),  # UDP 53
            "NetworkPolicies stop Ray worker -> DNS",
        ),
        (
            "NetworkPolicy",
            "mlflow",
            lambda d: d["spec"]["egress"].pop(0),
            "NetworkPolicies stop MLflow -> PostgreSQL (TCP 5432)",
        ),
        (
            "NetworkPolicy",
            "dask",
            lambda d: d["spec"]["egress"][1]["ports"][0].update(port=8334),
            "NetworkPolicies stop Dask job-runner -> s3 (TCP 8333)",
        ),
        (
            "NetworkPolicy",
            "s3",
            lambda d: d["spec"]["ingress"][0]["from"].pop(0),
            "NetworkPolicies stop Ray head -> s3 (TCP 8333)",
        ),
        # Security by default.
        (
            "StatefulSet",
            "physflow-postgres",
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["securityContext"].pop(
                "capabilities"
            ),
            "capabilities do not drop ALL",
        ),
        (
            "RayCluster",
            "physflow",
            lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
                {"name": "AWS_SECRET_ACCESS_KEY", "value": "inline"}
            ),
            "env AWS_SECRET_ACCESS_KEY is inlined",
        ),
        (
            "DaskJob",
            "physflow-preprocess",
            lambda d: d["spec"]["job"]["spec"]["initContainers"][0]["resources"].pop("limits"),
            "wait-for-services: no cpu limit",
        ),
        # Volumes the pods' limits cannot hold.
        (
            "RayCluster",
            "physflow",
            lambda d: [
                _resources(_group(d, "gpu"))[k].update({"ephemeral-storage": "20Gi"})
                for k in ("requests", "limits")
            ],
            "emptyDirs on disk (22.00Gi) exceed the ephemeral-storage limits (20.00Gi)",
        ),
        # What Ray would do badly: its object store on disk, a training driver on the head.
        (
            "RayCluster",
            "physflow",
            lambda d: _volume(_group(d, "cpu"), "shm")["emptyDir"].update(sizeLimit="4Gi"),
            "cpu: /dev/shm (4.00Gi in memory) cannot hold the object store (4.80Gi, 30 % of",
        ),
        (
            "RayCluster",
            "physflow",
            lambda d: _volume(_group(d, "gpu"), "shm").update(emptyDir={"sizeLimit": "16Gi"}),
            "gpu: /dev/shm (0.00Gi in memory) cannot hold the object store (14.40Gi",
        ),
        (
            "RayJob",
            "physflow-pbt",
            lambda d: _group(d, "head")["rayStartParams"].update(
                {"object-store-memory": "3000000000"}
            ),
            "head: /dev/shm (3.00Gi in memory) cannot hold the object store (2.79Gi, "
            "object-store-memory 3000000000)",
        ),
        (
            "RayJob",
            "physflow-nas",
            lambda d: [d["spec"].pop(k) for k in ("entrypointNumCpus", "entrypointNumGpus")],
            "its driver trains but reserves nothing (entrypointNumCpus/Gpus), so Ray runs it "
            "on the head",
        ),
        (
            "RayJob",
            "physflow-train",
            lambda d: d["spec"].pop("entrypointNumGpus"),
            "its driver trains on a CPU although the cluster has GPU workers",
        ),
        (
            "RayJob",
            "physflow-train",
            lambda d: d["spec"].update(entrypointNumCpus=16),
            "no worker group can hold its driver (16 CPU, 1 GPU)",
        ),
    ],
)
def test_each_mistake_is_caught(gpu_docs, schemas, kind, name, change, expected):
    found, _ = check_documents(_broken(gpu_docs, kind, name, change), "gpu", schemas)
    assert any(expected in str(f) for f in found), [str(f) for f in found]


def test_training_drivers_run_on_workers_and_gpu_ones_on_a_gpu(gpu_docs):
    """The train and nas drivers train the network themselves: they reserve a worker (a GPU
    in the gpu overlay); the pbt driver only schedules actors and stays on the head."""
    dev = {d["metadata"]["name"]: d["spec"] for d in render(OVERLAYS / "dev")
           if d["kind"] == "RayJob"}  # fmt: skip
    gpu = {d["metadata"]["name"]: d["spec"] for d in gpu_docs if d["kind"] == "RayJob"}
    for job in ("physflow-train", "physflow-nas"):
        assert dev[job]["entrypointNumCpus"] >= 1 and "entrypointNumGpus" not in dev[job]
        assert gpu[job]["entrypointNumGpus"] == 1 and gpu[job]["entrypointNumCpus"] >= 1
    for spec in (dev["physflow-pbt"], gpu["physflow-pbt"]):
        assert not any(k.startswith("entrypointNum") for k in spec)


def test_the_s3_store_serves_s3_alone_and_signs_its_own_apis(gpu_docs):
    """SeaweedFS's master, volume and filer HTTP APIs answer on the pod IP beside S3: the
    server checks tokens signed with a key of the Secret on the volume and filer ones, and
    runs nothing but S3 besides. Its flags are spelled as the `weed` binary spells them."""
    from infra.services import weed_binary

    s3 = _one(gpu_docs, "StatefulSet", "physflow-s3")["spec"]["template"]["spec"]
    container = s3["containers"][0]
    refs = {e["name"]: (e.get("valueFrom") or {}).get("secretKeyRef") for e in container["env"]}
    for part in ("SIGNING", "SIGNING_READ", "FILER_SIGNING", "FILER_SIGNING_READ"):
        assert refs[f"WEED_JWT_{part}_KEY"] == {"name": "physflow-s3", "key": "jwt-key"}
    args = container["args"]
    mini = args.index("mini")
    assert {"-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-admin.ui=false"} <= set(args[mini + 1 :])  # fmt: skip

    def flags(*command: str) -> set[str]:
        done = subprocess.run([weed_binary(), *command, "-h"], capture_output=True, text=True)
        return set(re.findall(r"^\s+(-[\w.]+)", done.stdout + done.stderr, re.MULTILINE))

    assert {a.split("=")[0] for a in args[:mini]} <= flags()  # logging options
    assert {a.split("=")[0] for a in args[mini + 1 :]} <= flags("mini")


def test_the_preprocessing_job_waits_for_what_it_uses(gpu_docs, tmp_path):
    """The DaskJob's pod is not restarted: its init container waits for the S3 store, MLflow
    and the job's Dask scheduler (the addresses the job itself uses), and gives up with a
    one-line reason when one does not answer in time."""
    import http.server
    import threading

    job = _one(gpu_docs, "DaskJob", "physflow-preprocess")
    pod = job["spec"]["job"]["spec"]
    init = pod["initContainers"][0]
    script, urls = init["args"][0], init["args"][1:]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    hosts = [u.split("/")[2] for u in urls]
    assert hosts == [
        env["PHYSFLOW_S3_ENDPOINT_URL"].split("/")[2],
        env["MLFLOW_TRACKING_URI"].split("/")[2],
        f"{job['metadata']['name']}-scheduler:8787",  # the operator's name for its service
    ]

    class Server(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # S3 without credentials: 403; /health: 200
            self.send_response(403 if self.path == "/" else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    here = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        done = subprocess.run([sys.executable, "-c", script, f"{here}/", f"{here}/health"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        quick, found = re.subn(r"\+ 600\b", "+ 1", script)
        assert found == 1  # the bound this test shortens
        done = subprocess.run([sys.executable, "-c", quick, f"{here}/", "http://127.0.0.1:1/"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 1
        assert done.stderr.strip().splitlines() == [
            "http://127.0.0.1:1/ did not answer within 10 minutes: "
            "<urlopen error [Errno 111] Connection refused>"
        ]
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("text", "value"),
    [("8Gi", 8 * 2**30), ("256Mi", 2**28), ("500m", 0.5), ("2", 2.0), (4, 4.0), ("1e3", 1e3),
     ("3000000000", 3e9), ("1G", 1e9)],
)  # fmt: skip
def test_quantities_read_as_kubernetes_reads_them(text, value):
    assert quantity(text) == value


POLICIES = list(
    yaml.safe_load_all("""
kind: NetworkPolicy
metadata: {name: deny, namespace: a}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
---
kind: NetworkPolicy
metadata: {name: api, namespace: a}
spec:
  podSelector: {matchLabels: {role: api}}
  ingress:
    - from:
        - podSelector:
            matchExpressions:
              - {key: tier, operator: In, values: [front, edge]}
              - {key: banned, operator: DoesNotExist}
        - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ops}}
      ports: [{port: 8265}]
---
kind: NetworkPolicy
metadata: {name: clients, namespace: a}
spec:
  podSelector: {matchExpressions: [{key: tier, operator: Exists}]}
  policyTypes: [Egress]
  egress:
    - to: [{podSelector: {matchLabels: {role: api}}}]
""")
)


@pytest.mark.parametrize(
    ("source", "port", "ok"),
    [
        (("a", {"tier": "front"}), 8265, True),
        (("a", {"tier": "edge"}), 8265, True),
        (("a", {"tier": "front"}), 8266, False),  # not the port the api admits
        (("a", {"tier": "back"}), 8265, False),  # In: another value
        (("a", {"tier": "front", "banned": "x"}), 8265, False),  # DoesNotExist
        (("a", {"role": "x"}), 8265, False),  # no egress: only default-deny selects it
        (("ops", {"any": "pod"}), 8265, True),  # another namespace, no policy there
        (("b", {"any": "pod"}), 8265, False),  # a namespace the api does not admit
    ],
)
def test_network_policies_are_evaluated_as_kubernetes_does(source, port, ok):
    assert allowed(POLICIES, source, ("a", {"role": "api"}), port, "TCP") is ok


def test_an_inlined_secret_is_refused(gpu_docs, schemas):
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "physflow-postgres", "namespace": "physflow"},
        "stringData": {"password": "hunter2"},
    }
    found, _ = check_documents([*gpu_docs, secret], "gpu", schemas)
    assert any("a Secret with its values in the manifests" in str(f) for f in found)


@pytest.mark.parametrize(
    ("image", "version", "ok"),
    [
        ("rayproject/ray:2.60.0-py311-gpu", "2.60.0", True),
        ("registry.example.com:5000/physflow:0.1.0-ray2.60.0", "2.60.0", True),
        ("rayproject/ray:2.60.01", "2.60.0", False),
        ("physflow:0.1.0-ray2.59.0", "2.60.0", False),
        ("physflow", "2.60.0", False),
    ],
)
def test_image_tag_against_ray_version(image, version, ok):
    assert image_matches_ray(image, version) is ok


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:latest\nRUN pip install torch\n")
    found = [str(f) for f in k8s_check.run_hadolint(bad)]
    assert any("DL3007" in f for f in found) and any("DL3013" in f for f in found), found


def test_an_overlays_path_without_kustomizations_is_one_line(capsys):
    from infra.k8s_check import main

    with pytest.raises(SystemExit) as stop:
        main(["--overlays", "k8s/overlays/nope"])
    assert stop.value.code == 2
    assert "--overlays k8s/overlays/nope: no kustomization.yaml" in capsys.readouterr().err
