"""The one-machine stack behind `make stack-up` / `make stack-down`: the S3 store, an MLflow
server with its artifacts proxied to it, and optionally a Ray head with token
authentication — all on 127.0.0.1, running in the background.

Everything lives in one folder (`PHYSFLOW_STACK_DIR`, default `.physflow/stack`): the data,
the logs, and `stack.json` (mode 0600) with the ports, the generated credentials and the
running process groups. A stack started again reuses the same ports and credentials, so
it serves what the last one stored, and the variables printed once stay valid.

    python -m infra.stack up [--ray]   # start (or say it is up); print the exports
    python -m infra.stack env          # print the exports again
    python -m infra.stack down         # stop the processes; the data stays
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

from infra.services import (
    GRPC_OFFSET,
    RAY_PORTS,
    WEED_PORTS,
    free_port,
    port_free,
    start_mlflow,
    start_ray_head,
    start_seaweedfs,
    stop_group,
)

BUCKET = "physflow"
# Ports a person may have memorised; taken when free on the first start.
PREFERRED = {"s3.port": 8333, "mlflow": 5001, "dashboard-port": 8265, "port": 6380}
# What identifies each service's process group, to never signal a recycled pid.
MARKERS = {"seaweedfs": "weed", "mlflow": "mlflow", "ray": "ray"}


def stack_dir() -> Path:
    return Path(os.environ.get("PHYSFLOW_STACK_DIR", ".physflow/stack")).absolute()


def load_state(root: Path) -> dict[str, Any]:
    path = root / "stack.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_state(root: Path, state: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)  # its data, its runs and its credentials: this user's only
    path = root / "stack.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.chmod(0o600)
    tmp.replace(path)


def _port(name: str) -> int:
    grpc = name in WEED_PORTS
    preferred = PREFERRED.get(name)
    if preferred is not None and port_free(preferred):
        if not grpc or port_free(preferred + GRPC_OFFSET):
            return preferred
    return free_port(grpc=grpc)


def _settings(state: dict[str, Any]) -> dict[str, Any]:
    """Ports and credentials: chosen on the first start, kept for every later one."""
    ports = state.setdefault("ports", {})
    for name in WEED_PORTS:  # a stack chosen before gRPC was minded may hold a port without
        if ports.get(name, 0) + GRPC_OFFSET > 65535:
            ports.pop(name)
    for name in (*WEED_PORTS, "mlflow", *RAY_PORTS):
        ports.setdefault(name, _port(name))
    creds = state.setdefault("credentials", {})
    creds.setdefault("access_key", "physflow")
    creds.setdefault("secret_key", secrets.token_hex(16))
    creds.setdefault("ray_token", secrets.token_hex(24))
    return state


def running(state: dict[str, Any]) -> dict[str, int]:
    """The stack's process groups that are still alive and still ours."""
    alive = {}
    for name, pgid in (state.get("groups") or {}).items():
        try:
            cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if MARKERS[name].encode() in cmdline:
            alive[name] = pgid
    return alive


def exports(state: dict[str, Any]) -> dict[str, str]:
    return dict(state.get("env") or {})


class PortTaken(Exception):
    """A port of the stack is in use by something else."""


def up(ray: bool = False) -> dict[str, str]:
    root = stack_dir()
    state = _settings(load_state(root))
    alive = running(state)
    wanted = {"seaweedfs", "mlflow", *(["ray"] if ray else [])}
    if wanted <= alive.keys():
        return exports(state)
    if alive:  # a service has died, or the Ray head is wanted now: start them all again
        down()
        state = load_state(root)
    ports, creds = state["ports"], state["credentials"]
    names = [*WEED_PORTS, "mlflow", *(RAY_PORTS if ray else ())]
    taken = [f"{ports[n]} ({n})" for n in names if not port_free(ports[n])]
    taken += [f"{ports[n] + GRPC_OFFSET} ({n} + {GRPC_OFFSET}: SeaweedFS's gRPC)"
              for n in WEED_PORTS if not port_free(ports[n] + GRPC_OFFSET)]  # fmt: skip
    if taken:
        raise PortTaken(
            f"port {', '.join(taken)} of the stack is taken by another program; stop it, "
            f"or keep this stack's data in another folder, with ports of its own: "
            f"PHYSFLOW_STACK_DIR=<folder> make stack-up"
        )
    started = []
    try:
        s3 = start_seaweedfs(
            root / "s3", creds["access_key"], creds["secret_key"], [BUCKET],
            ports={k: ports[k] for k in WEED_PORTS},
        )  # fmt: skip
        started.append(s3)
        mlflow = start_mlflow(
            root / "mlflow", f"s3://{BUCKET}/mlartifacts", s3.env, port=ports["mlflow"]
        )
        started.append(mlflow)
        env = {**s3.env, **mlflow.env, "PHYSFLOW_STORAGE": f"s3://{BUCKET}/data"}
        if ray:
            head = start_ray_head(
                root / "ray", creds["ray_token"], env=env,
                ports={k: ports[k] for k in RAY_PORTS},
            )  # fmt: skip
            started.append(head)
            env.update(head.env)
            state["ray_scratch"] = str(head.scratch)
    except BaseException:
        for service in reversed(started):
            service.stop()
        raise
    state["groups"] = {s.name: s.process.pid for s in started}
    state["env"] = env
    save_state(root, state)
    return env


def stop_jobs(env: dict[str, str], wait_s: float = 90.0) -> list[str]:
    """Stop the Ray head's running jobs as `physflow stop` does (SIGTERM: each saves what
    it finished) and wait for them: their drivers are not in the head's process group."""
    import time

    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
    try:
        client = JobSubmissionClient(env["RAY_API_SERVER_ADDRESS"], headers=headers)
        ids = [j.submission_id for j in client.list_jobs()
               if j.submission_id and not j.status.is_terminal()]  # fmt: skip
        for sid in ids:
            client.stop_job(sid)
        deadline, waiting = time.monotonic() + wait_s, list(ids)
        while waiting and time.monotonic() < deadline:
            time.sleep(0.5)
            waiting = [s for s in waiting if not client.get_job_status(s).is_terminal()]
    except Exception as exc:  # noqa: BLE001 - a head that no longer answers has no jobs
        print(f"# the Ray jobs could not be stopped ({type(exc).__name__})", file=sys.stderr)
        return []
    return ids


def down() -> list[str]:
    """Stop what runs (the Ray head's jobs first); keep the data, the ports and the
    credentials."""
    root = stack_dir()
    state = load_state(root)
    stopped = []
    alive = running(state)
    if "ray" in alive and "RAY_API_SERVER_ADDRESS" in (state.get("env") or {}):
        jobs = stop_jobs(state["env"])
        if jobs:
            print(f"# stopped {len(jobs)} running job(s): {', '.join(jobs)}")
    for name, pgid in alive.items():
        stop_group(pgid)
        stopped.append(name)
    if state.get("ray_scratch"):
        shutil.rmtree(state.pop("ray_scratch"), ignore_errors=True)
    state["groups"] = {}
    state.pop("env", None)
    if state:
        save_state(root, state)
    return stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the local physflow stack")
    parser.add_argument("action", nargs="?", default="up", choices=("up", "down", "env"))
    parser.add_argument("--ray", action="store_true", help="also a Ray head (token auth)")
    args = parser.parse_args(argv)
    if args.action == "down":
        stopped = down()
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}; data kept in {stack_dir()}")
        return 0
    try:
        env = up(args.ray) if args.action == "up" else exports(load_state(stack_dir()))
    except PortTaken as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not env:
        print("the stack is not running: make stack-up", file=sys.stderr)
        return 1
    print(f"# the local stack is up (data in {stack_dir()}); in your shell:")
    for key, value in env.items():
        print(f"export {key}={value}")
    if "RAY_API_SERVER_ADDRESS" in env:
        print("# . .venv/bin/activate; physflow submit configs/quickstart.yaml --follow")
    print("# stop it with: make stack-down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
