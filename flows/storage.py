"""Where jobs keep what they write: a local folder or an `s3://` prefix, through fsspec.

The root comes from `PHYSFLOW_STORAGE` (default: the `.physflow/` folder of the embedded
runtime). For S3-compatible stores the endpoint comes from `PHYSFLOW_S3_ENDPOINT_URL`
(or botocore's `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`); credentials are never part of
a spec or a URL — s3fs reads them from the environment or the pod's identity, as boto does.

Writes are atomic: an object PUT is all-or-nothing on S3, and on a local disk a file is
written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import fsspec

from flows.errors import JobFailure, UserError

SUPPORTED_PROTOCOLS = ("file", "s3")


def physflow_home() -> Path:
    """The embedded runtime's folder: `PHYSFLOW_HOME`, default `./.physflow`."""
    return Path(os.environ.get("PHYSFLOW_HOME", ".physflow")).absolute()


def s3_endpoint_url() -> str | None:
    for var in ("PHYSFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


@dataclass(frozen=True)
class Storage:
    """A storage root. `url` is absolute: `/abs/path` or `s3://bucket/prefix`."""

    url: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, url: str | None = None) -> Storage:
        """The root named by `url`, else `PHYSFLOW_STORAGE`, else the embedded folder."""
        url = url or os.environ.get("PHYSFLOW_STORAGE") or str(physflow_home())
        return cls.at(url)

    @classmethod
    def at(cls, url: str) -> Storage:
        protocol, _, rest = url.partition("://") if "://" in url else ("file", "", url)
        if protocol not in SUPPORTED_PROTOCOLS:
            raise UserError(
                f"storage URL {url!r}: unsupported scheme {protocol!r} "
                f"(use a local path or s3://bucket/prefix)"
            )
        if protocol == "file":
            return cls(url=str(Path(rest).absolute()))
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise UserError(f"storage URL {url!r}: no bucket name (use s3://bucket/prefix)")
        options: dict[str, Any] = {}
        endpoint = s3_endpoint_url()
        if endpoint:
            options["endpoint_url"] = endpoint
        return cls(url="s3://" + rest.rstrip("/"), options=options)

    def __getstate__(self) -> dict[str, Any]:
        # Ship the URL and options to workers, not a live filesystem (and its cache).
        return {"url": self.url, "options": self.options}

    @property
    def is_local(self) -> bool:
        return "://" not in self.url

    @cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self.is_local:
            return fsspec.filesystem("file")
        # A fresh instance: s3fs caches listings per instance, and other processes write here.
        return fsspec.filesystem("s3", skip_instance_cache=True, **self.options)

    def join(self, *parts: str) -> str:
        return posixpath.join(self.url, *parts)

    def child(self, *parts: str) -> Storage:
        return Storage(url=self.join(*parts), options=self.options)

    def check(self) -> Storage:
        """Fail early, naming the bucket, if an S3 root's bucket does not exist; a local
        root is created, and one that cannot be is named."""
        if self.is_local:
            try:
                Path(self.url).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                why = "a file, not a folder" if isinstance(exc, FileExistsError) else exc.strerror
                raise UserError(f"storage {self.url}: cannot be a folder here ({why})") from None
        else:
            bucket = self.url[5:].split("/", 1)[0]
            try:
                self._guard(self.url, lambda: self.fs.call_s3("head_bucket", Bucket=bucket))
            except FileNotFoundError:
                raise UserError(f"storage {self.url}: bucket {bucket!r} does not exist") from None
        return self

    # Reads ---------------------------------------------------------------------------

    def exists(self, path: str) -> bool:
        return self._guard(path, lambda: self.fs.exists(path))

    def read_bytes(self, path: str) -> bytes:
        return self._guard(path, lambda: self.fs.cat_file(path))

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_bytes(path))

    def list_dirs(self, path: str) -> list[str]:
        """Names of the immediate sub-folders of `path` (empty if it does not exist)."""
        return self._names(path, "directory")

    def list_files(self, path: str) -> list[str]:
        """Names of the files directly in `path` (empty if it does not exist)."""
        return self._names(path, "file")

    def _names(self, path: str, kind: str) -> list[str]:
        def run() -> list[str]:
            if not self.fs.exists(path):
                return []
            entries = self.fs.ls(path, detail=True, refresh=True)
            return sorted(
                posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == kind
            )

        return self._guard(path, run)

    def size(self, path: str) -> int:
        return int(self._guard(path, lambda: self.fs.size(path)))

    # Writes --------------------------------------------------------------------------

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write `data` to `path` so that readers see the old file, or all of the new one."""

        def run() -> None:
            if self.is_local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(path, data)

        self._guard(path, run)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

    def remove(self, path: str, recursive: bool = False) -> None:
        def run() -> None:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=recursive)

        self._guard(path, run)

    def _guard(self, path: str, action):
        """Turn the store's low-level errors into one line that names the path."""
        try:
            return action()
        except PermissionError as exc:
            raise UserError(f"{path}: access denied by the store ({_brief(exc)})") from None
        except FileNotFoundError as exc:
            if not self.is_local and "bucket" in str(exc).lower():
                bucket = self.url[5:].split("/", 1)[0]
                raise UserError(f"{path}: bucket {bucket!r} does not exist") from None
            raise
        except OSError as exc:
            if self.is_local:
                raise JobFailure(f"{path}: {_brief(exc)}") from None
            raise UserError(f"{path}: cannot reach {self._where()} ({_brief(exc)})") from None
        except Exception as exc:
            # botocore's own (no credentials, an endpoint that does not answer) are not
            # OSErrors; known by name, botocore being s3fs's to import
            kinds = {c.__name__ for c in type(exc).__mro__}
            if self.is_local or "BotoCoreError" not in kinds:
                raise
            hint = " (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile)" if (
                "NoCredentialsError" in kinds) else ""  # fmt: skip
            raise UserError(f"{path}: cannot reach {self._where()}: {_brief(exc)}{hint}") from None

    def _where(self) -> str:
        return f"the S3 store at {self.options.get('endpoint_url', 'the default AWS endpoint')}"


def _brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
