"""The one-machine stack (`make stack-up` / `stack-down`): it runs in the background, stops
cleanly, and a restarted stack serves what the last one stored, at the same addresses."""

from __future__ import annotations

import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import s3fs

from infra import stack


def weed_litter() -> set[str]:
    """What SeaweedFS leaves in the temp folder unless told otherwise: its logs, its S3
    gateway's socket and WebDAV's chunk cache (a folder named by 8 hex digits)."""
    return {
        p.name
        for p in Path(tempfile.gettempdir()).iterdir()
        if p.name.startswith(("weed.", "seaweedfs-s3-")) or re.fullmatch(r"[0-9a-f]{8}", p.name)
    }


def test_seaweedfs_ports_leave_room_for_their_grpc_ports():
    """SeaweedFS listens for gRPC on each port + 10 000: a port above 55 535 has none, and
    a stack that kept one (chosen before this was minded) gets another."""
    from infra.services import GRPC_OFFSET, free_port, port_free

    for _ in range(200):
        port = free_port(grpc=True)
        assert port + GRPC_OFFSET <= 65535
    state = stack._settings({"ports": {"admin.port": 57903, "filer.port": 31000}})
    assert state["ports"]["admin.port"] + GRPC_OFFSET <= 65535
    assert state["ports"]["filer.port"] == 31000  # a good one is kept
    assert not port_free(70000)


def test_a_restarted_stack_keeps_its_data_ports_and_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("PHYSFLOW_STACK_DIR", str(tmp_path / "stack"))
    litter = weed_litter()
    env = stack.up()
    try:
        assert env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
        fs = s3fs.S3FileSystem(
            endpoint_url=env["PHYSFLOW_S3_ENDPOINT_URL"],
            key=env["AWS_ACCESS_KEY_ID"],
            secret=env["AWS_SECRET_ACCESS_KEY"],
            skip_instance_cache=True,
        )
        fs.pipe_file("physflow/data/kept.txt", b"still here")
        # the same data over the filer's own HTTP API: refused without the signed token
        filer = stack.load_state(tmp_path / "stack")["ports"]["filer.port"]
        for method in ("GET", "PUT", "DELETE"):
            url = f"http://127.0.0.1:{filer}/buckets/physflow/data/kept.txt"
            request = urllib.request.Request(
                url, method=method, data=b"x" if method == "PUT" else None
            )
            with pytest.raises(urllib.error.HTTPError, match="401"):
                urllib.request.urlopen(request, timeout=10)
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        experiment_id = mlflow.create_experiment("kept")
        assert stack.up() == env  # already up: the same stack, not a second one
    finally:
        assert set(stack.down()) == {"seaweedfs", "mlflow"}
    assert stack.running(stack.load_state(tmp_path / "stack")) == {}
    assert (tmp_path / "stack" / "stack.json").stat().st_mode & 0o077 == 0
    assert (tmp_path / "stack").stat().st_mode & 0o077 == 0  # its data: this user's only
    assert weed_litter() <= litter  # its logs and socket stay in the stack's folder

    again = stack.up()
    try:
        assert again == env
        fs = s3fs.S3FileSystem(
            endpoint_url=again["PHYSFLOW_S3_ENDPOINT_URL"],
            key=again["AWS_ACCESS_KEY_ID"],
            secret=again["AWS_SECRET_ACCESS_KEY"],
            skip_instance_cache=True,
        )
        assert fs.cat_file("physflow/data/kept.txt") == b"still here"
        assert mlflow.get_experiment_by_name("kept").experiment_id == experiment_id
        # a service that died is started again (with the rest), not reported as up
        from infra.services import stop_group

        stop_group(stack.running(stack.load_state(tmp_path / "stack"))["mlflow"])
        assert stack.up() == env
        assert mlflow.get_experiment_by_name("kept").experiment_id == experiment_id
    finally:
        stack.down()
    # a port of it taken by another program: said, nothing started
    import socket

    port = int(env["MLFLOW_TRACKING_URI"].rsplit(":", 1)[1])
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # its last connections
        other.bind(("127.0.0.1", port))
        other.listen()
        with pytest.raises(stack.PortTaken, match=f"port {port} \\(mlflow\\) of the stack is"):
            stack.up()
    assert stack.running(stack.load_state(tmp_path / "stack")) == {}
