"""Submitting a job as a KubeRay RayJob through the Kubernetes API, and following it there.

`physflow submit --kubernetes` (and `jobs | status | logs | stop --kubernetes`): the job
prepared by `flows.submit.prepare` becomes a RayJob custom resource with a cluster of its
own, created through the Kubernetes API (kubeconfig or in-cluster identity), the spec in a
ConfigMap owned by the RayJob. There the image's code runs, and the settings and credentials
are the pods' own (Secrets); only `--env` travels. The RayJob's cluster is token-
authenticated, its pods non-root with equal requests and limits, and KubeRay deletes it
after the job; deleting the RayJob stops the job. Its submitter pod (the Job that runs
`ray job submit`) is ours too: KubeRay's default one has no securityContext, which the
namespace's restricted Pod Security refuses, and no label a NetworkPolicy could let through
to the head.

Every failure a person can meet (no Kubernetes configuration, no image, a RayJob already
there, none found, access refused) becomes one `UserError` line.
"""

from __future__ import annotations

import codecs
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from flows.errors import JobFailure, PhysflowError, UserError
from flows.submit import (
    SPEC_FILE,
    TERMINAL,
    JobState,
    Submission,
    _digest,
    _first_line,
    _slug,
)

# The RayJob -------------------------------------------------------------------------------

RAY_VERSION = "2.60.0"  # the pinned Ray; the image's tag carries it
SPEC_MOUNT = "/etc/physflow/spec"
CLUSTER_ENV = [
    {"name": "PHYSFLOW_STORAGE", "value": "s3://physflow/data"},
    {"name": "PHYSFLOW_S3_ENDPOINT_URL", "value": "http://physflow-s3:8333"},
    {"name": "MLFLOW_TRACKING_URI", "value": "http://physflow-mlflow:5000"},
    {"name": "MLFLOW_TRACKING_USERNAME", "value": "physflow-jobs"},
    {"name": "AWS_DEFAULT_REGION", "value": "us-east-1"},
    {
        "name": "MLFLOW_TRACKING_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": "physflow-mlflow", "key": "jobs-password"}},
    },  # noqa: E501
    {
        "name": "AWS_ACCESS_KEY_ID",
        "valueFrom": {"secretKeyRef": {"name": "physflow-s3", "key": "access-key"}},
    },  # noqa: E501
    {
        "name": "AWS_SECRET_ACCESS_KEY",
        "valueFrom": {"secretKeyRef": {"name": "physflow-s3", "key": "secret-key"}},
    },  # noqa: E501
]
# The submitter pods' labels: `physflow.io/ray-client` is what k8s/base/networkpolicies.yaml
# lets reach a Ray head's job API (8265).
SUBMITTER_LABELS = {"app.kubernetes.io/part-of": "physflow", "physflow.io/ray-client": "true"}
DEPLOYMENT_TO_STATUS = {"Complete": "SUCCEEDED", "Failed": "FAILED"}
# The jobs whose driver trains a network itself (the experts or evaluators are actors)
DRIVER_TRAINS = ("train", "run", "nas")
ENTRYPOINT_GPUS_VAR = "PHYSFLOW_ENTRYPOINT_GPUS"  # as actors.experts reads it


def rayjob_name(sub: Submission) -> str:
    """A DNS-1035 name of at most 47 characters (KubeRay's limit for a RayJob)."""
    digest = _digest(sub.submission_id)[:8]
    return f"pf-{sub.job}-{_slug(sub.name)[: 47 - len(sub.job) - 13]}-{digest}".replace("--", "-")


def rayjob_manifest(
    sub: Submission, name: str, image: str, gpu_workers: int = 0, cpu_workers: int = 1
) -> dict[str, Any]:
    """The RayJob for `sub`: its own token-authenticated cluster, non-root pods with equal
    requests and limits, credentials from the namespace's Secrets, deleted after the job."""
    if gpu_workers + cpu_workers < 1:
        raise UserError("--gpu-workers and --cpu-workers: at least one worker is needed")
    head = _ray_pod(image, "ray-head", "physflow-ray-head", {"cpu": "2", "memory": "8Gi"})
    head["spec"]["volumes"].append({"name": "spec", "configMap": {"name": f"{name}-spec"}})
    head["spec"]["containers"][0]["volumeMounts"].append(
        {"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True}
    )
    # a job whose driver trains a network (train, run, nas: only the experts or the
    # evaluators are actors) gets a GPU worker more for that driver, or else a CPU worker's
    # core: the head takes no work (num-cpus 0)
    trains = sub.job in DRIVER_TRAINS
    groups = []
    if cpu_workers:
        pod = _ray_pod(image, "ray-worker", "physflow-ray-worker", {"cpu": "4", "memory": "16Gi"})
        groups.append(_group("cpu", cpu_workers, pod))
    if gpu_workers:
        pod = _ray_pod(
            image, "ray-worker", "physflow-ray-worker",
            {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "1"},
        )  # fmt: skip
        pod["spec"]["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
        groups.append(_group("gpu", gpu_workers + trains, pod))
    env = dict(sub.explicit_env)
    entrypoint = {}
    if trains and gpu_workers:
        env[ENTRYPOINT_GPUS_VAR] = "1"  # what the experts leave to the driver
        entrypoint = {"entrypointNumGpus": 1}
    elif trains:
        entrypoint = {"entrypointNumCpus": 1}
    annotations = {f"physflow.io/{k.split('.', 1)[1].replace('_', '-')}": v
                   for k, v in sub.metadata.items()}  # fmt: skip
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/part-of": "physflow", "physflow.io/job": sub.job},
            "annotations": annotations,
        },
        "spec": {
            "entrypoint": sub.entrypoint(f"{SPEC_MOUNT}/{SPEC_FILE}"),
            "submissionMode": "K8sJobMode",
            "submitterPodTemplate": submitter_pod(image, job=sub.job),
            "jobId": sub.submission_id,
            "metadata": dict(sub.metadata),
            "runtimeEnvYAML": yaml.safe_dump({"env_vars": env}),
            **entrypoint,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 300,
            "backoffLimit": 0,
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "authOptions": {"mode": "token"},
                "headGroupSpec": {
                    "serviceType": "ClusterIP",
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": head,
                },
                "workerGroupSpecs": groups,
            },
        },
    }


def _group(name: str, n: int, pod: dict) -> dict[str, Any]:
    return {"groupName": name, "replicas": n, "minReplicas": n, "maxReplicas": n,
            "rayStartParams": {}, "template": pod}  # fmt: skip


def image_matches_ray(image: str, version: str) -> bool:
    """rayproject/ray:<version>-… or an image whose tag names ray<version>."""
    tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
    return (
        tag.startswith(version)
        and tag[len(version) : len(version) + 1] in ("", "-")
        or (f"ray{version}" in tag)
    )


def submitter_pod(image: str, job: str | None = None) -> dict[str, Any]:
    """The pod that runs `ray job submit` (KubeRay fills its command, the head's address and,
    the cluster being token-authenticated, RAY_AUTH_TOKEN from the cluster's Secret)."""
    pod = _ray_pod(image, "ray-job-submitter", "physflow-ray-submitter",
                   {"cpu": "500m", "memory": "1Gi"}, ephemeral="1Gi")  # fmt: skip
    container = pod["spec"]["containers"][0]
    container.pop("env")  # it needs no credential: the operator adds what it needs
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "shm"]
    pod["spec"]["volumes"] = [
        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
        {"name": "cache", "emptyDir": {"sizeLimit": "256Mi"}},
    ]
    pod["spec"]["restartPolicy"] = "Never"
    labels = dict(SUBMITTER_LABELS, **({"physflow.io/job": job} if job else {}))
    return {"metadata": {"labels": labels}, **pod}


def _ray_pod(
    image: str, container: str, account: str, size: dict[str, str], ephemeral: str = "10Gi"
) -> dict[str, Any]:
    resources = {**size, "ephemeral-storage": ephemeral}
    return {
        "spec": {
            "serviceAccountName": account,
            "automountServiceAccountToken": False,  # not autoscaled: no API calls to make
            "securityContext": {
                "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": container,
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "env": [dict(e) for e in CLUSTER_ENV],
                    "resources": {"requests": dict(resources), "limits": dict(resources)},
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [
                        {"name": "tmp", "mountPath": "/tmp"},
                        {"name": "cache", "mountPath": "/home/ray/.cache"},
                        {"name": "shm", "mountPath": "/dev/shm"},
                    ],
                }
            ],
            "volumes": [
                {"name": "tmp", "emptyDir": {"sizeLimit": "8Gi"}},
                {"name": "cache", "emptyDir": {"sizeLimit": "1Gi"}},  # read-only root: ~/.cache
                {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": _shm(size)}},
            ],
        }
    }  # fmt: skip


def _shm(size: dict[str, str]) -> str:
    """/dev/shm for a pod of `size`: Ray's object store takes 30 % of the pod's memory, and
    goes to disk where /dev/shm cannot hold it (with a tenth to spare)."""
    gib = int(size["memory"].removesuffix("Gi"))
    return f"{math.ceil(gib * 0.33)}Gi"


# The Kubernetes API -----------------------------------------------------------------------


class KubeRayJobs:
    """RayJobs in one namespace, through the Kubernetes API, with one-line errors."""

    poll_s = 2.0

    def __init__(self, namespace: str | None = None):
        from kubernetes import client, config

        # An explicit configuration: the client's process-wide default would outlive a
        # change of KUBECONFIG within one process.
        settings = client.Configuration()
        # Read KUBECONFIG now: the client reads it once, when it is imported.
        kubeconfig = os.environ.get("KUBECONFIG") or "~/.kube/config"
        try:
            config.load_kube_config(config_file=kubeconfig, client_configuration=settings)
            _, context = config.list_kube_config_contexts(config_file=kubeconfig)
            default_ns = (context or {}).get("context", {}).get("namespace")
        except (config.ConfigException, FileNotFoundError, TypeError):
            try:
                config.load_incluster_config(client_configuration=settings)
            except config.ConfigException:
                raise UserError(
                    "no Kubernetes configuration: set KUBECONFIG (or ~/.kube/config), or run "
                    "in a pod"
                ) from None
            default_ns = _incluster_namespace()
        self.namespace = namespace or default_ns or "physflow"
        api_client = client.ApiClient(settings)
        self.api = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.host = settings.host

    def submit(
        self, sub: Submission, image: str | None, gpu_workers: int = 0, cpu_workers: int = 1
    ) -> str:
        image = image or os.environ.get("PHYSFLOW_IMAGE")
        if not image:
            raise UserError(
                f"--image: which physflow image runs the job? e.g. "
                f"<registry>/physflow:0.1.0-ray{RAY_VERSION} (or set PHYSFLOW_IMAGE)"
            )
        if not image_matches_ray(image, RAY_VERSION):
            raise UserError(
                f"--image {image}: its tag does not carry Ray {RAY_VERSION}, the cluster's "
                f"rayVersion; e.g. <registry>/physflow:0.1.0-ray{RAY_VERSION}"
            )
        sub = sub.on_image(image)  # the image's code runs, not this checkout's
        name = rayjob_name(sub)
        body = rayjob_manifest(sub, name, image, gpu_workers, cpu_workers)
        with self._errors(name):
            created = self.api.create_namespaced_custom_object(
                "ray.io", "v1", self.namespace, "rayjobs", body
            )
            # The spec lives as long as its RayJob: Kubernetes deletes it with its owner.
            owner = {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": name,
                     "uid": created["metadata"]["uid"], "controller": False}  # fmt: skip
            self.core.create_namespaced_config_map(
                self.namespace,
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": f"{name}-spec", "ownerReferences": [owner],
                                 "labels": {"app.kubernetes.io/part-of": "physflow"}},
                    "data": {SPEC_FILE: yaml.safe_dump(sub.spec, sort_keys=False)},
                },
            )  # fmt: skip
        return name

    def state(self, name: str) -> JobState:
        with self._errors(name):
            obj = self.api.get_namespaced_custom_object(
                "ray.io", "v1", self.namespace, "rayjobs", name
            )
        return _rayjob_state(obj)

    def list(self) -> list[JobState]:
        with self._errors():
            found = self.api.list_namespaced_custom_object(
                "ray.io", "v1", self.namespace, "rayjobs",
                label_selector="app.kubernetes.io/part-of=physflow",
            )  # fmt: skip
        rows = [_rayjob_state(o) for o in found.get("items", [])]
        return sorted(rows, key=lambda r: r.start_s or 0, reverse=True)

    def logs(self, name: str) -> str:
        """The submitter's output (`ray job submit` follows the job's own logs)."""
        pod = self._submitter_pod(name)
        if pod is None:
            return ""
        with self._errors(name):
            return self.core.read_namespaced_pod_log(pod, self.namespace)

    def follow(self, name: str, write: Callable[[str], None]) -> JobState:
        state = self.state(name)
        while not state.terminal and self._submitter_pod(name) is None:
            time.sleep(self.poll_s)
            state = self.state(name)
        pod = self._submitter_pod(name)
        if pod is not None:
            with self._errors(name):
                # streamed as it comes: with its content preloaded, the client would
                # return only once the pod had ended, hours later for a training job
                response = self.core.read_namespaced_pod_log(
                    pod, self.namespace, follow=True, _preload_content=False
                )
                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                try:
                    while data := response.read1(65536):  # what has come, not a full buffer
                        write(decoder.decode(data))
                    write(decoder.decode(b"", final=True))
                finally:
                    response.release_conn()
        while not state.terminal:
            time.sleep(self.poll_s)
            state = self.state(name)
        return state

    def stop(self, name: str) -> bool:
        """Delete the RayJob: KubeRay stops the job and removes its cluster."""
        self.state(name)
        self.delete(name)
        return True

    def delete(self, name: str) -> None:
        with self._errors(name):
            self.api.delete_namespaced_custom_object(
                "ray.io", "v1", self.namespace, "rayjobs", name,
                propagation_policy="Foreground",
            )  # fmt: skip

    def _submitter_pod(self, name: str) -> str | None:
        with self._errors(name):
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"job-name={name}")
        started = [p for p in pods.items if (p.status and p.status.phase) != "Pending"]
        started.sort(key=lambda p: p.metadata.creation_timestamp or 0)
        return started[-1].metadata.name if started else None

    @contextmanager
    def _errors(self, name: str | None = None) -> Iterator[None]:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        where = f"Kubernetes at {self.host}"
        try:
            yield
        except PhysflowError:
            raise
        except ApiException as exc:
            if exc.status == 409:
                raise UserError(
                    f"RayJob {name} already exists in namespace {self.namespace}: it was "
                    f"submitted before (see physflow status {name} --kubernetes); pass "
                    f"--submission-id to run it again"
                ) from None
            if exc.status == 404:
                raise UserError(
                    f"no RayJob {name} in namespace {self.namespace} (or KubeRay's CRDs are "
                    f"not installed)"
                ) from None
            if exc.status in (401, 403):
                raise UserError(
                    f"{where} refused ({exc.status} {exc.reason}): this identity may not "
                    f"manage RayJobs in {self.namespace} (Role physflow-submitter)"
                ) from None
            raise JobFailure(f"{where}: {exc.status} {exc.reason}") from None
        except (HTTPError, OSError) as exc:
            raise UserError(f"{where}: cannot connect ({_first_line(exc)})") from None


def _rayjob_state(obj: dict[str, Any]) -> JobState:
    status = obj.get("status") or {}
    deployment = status.get("jobDeploymentStatus", "")
    job_status = status.get("jobStatus") or ""
    if deployment in DEPLOYMENT_TO_STATUS and job_status not in TERMINAL:
        job_status = DEPLOYMENT_TO_STATUS[deployment]
    spec = obj.get("spec") or {}
    return JobState(
        submission_id=obj["metadata"]["name"],
        status=job_status or "PENDING",
        message=status.get("message") or deployment,
        entrypoint=spec.get("entrypoint", ""),
        start_s=_timestamp(status.get("startTime")),
        end_s=_timestamp(status.get("endTime")),
        exit_code=None,
        metadata=dict(spec.get("metadata") or {}),
    )


def _timestamp(text: str | None) -> float | None:
    if not text:
        return None
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _incluster_namespace() -> str | None:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.is_file() else None
