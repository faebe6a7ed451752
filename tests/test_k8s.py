"""`make k8s-check` on the real overlays (everything passes) and on deliberately broken
manifests (each mistake is caught, by the check meant to catch it)."""

from __future__ import annotations

import copy
import os
import shutil
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
    ],
)
def test_each_mistake_is_caught(gpu_docs, schemas, kind, name, change, expected):
    found, _ = check_documents(_broken(gpu_docs, kind, name, change), "gpu", schemas)
    assert any(expected in str(f) for f in found), [str(f) for f in found]


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
