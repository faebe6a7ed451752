"""Job specs: YAML files validated by pydantic models, with `--set key.path=value` overrides.

Every job reads its spec through `load_spec`. Whatever is wrong with a spec — a file that
does not exist, YAML that does not parse, an unknown key, a wrong type, an impossible
value — becomes one `UserError` line that names the file, the key path and the reason.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from flows.errors import UserError

SpecT = TypeVar("SpecT", bound="Spec")


class Spec(BaseModel):
    """Base of every job spec: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def resolved(self) -> dict[str, Any]:
        """The spec as plain JSON-compatible data, defaults filled in."""
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """A short, stable hash of the resolved spec: equal specs, equal digests."""
        return digest_of(self.resolved())


def digest_of(data: dict[str, Any]) -> str:
    """A short, stable hash of JSON-compatible data (key order does not matter)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), the value read as a YAML scalar or flow list."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected key.path=value, e.g. --set samples=64")
    path = [part.strip() for part in key.split(".")]
    if any(not part for part in path):
        raise UserError(f"--set {text!r}: empty part in key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise UserError(f"--set {text!r}: value is not valid YAML ({_first_line(exc)})") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.path=value` applied, creating mappings as needed."""
    data = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise UserError(f"--set {text!r}: {where} is a value, not a mapping")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a spec file")
    if not path.is_file():
        raise UserError(f"{path}: spec file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({_first_line(exc)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a spec is a YAML mapping, got {type(data).__name__}")
    return data


def validate(model: type[SpecT], data: dict[str, Any], source: str) -> SpecT:
    """Validate plain data against `model`; any error becomes one `UserError` line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{source}: {describe_errors(exc)}") from None


def load_spec(model: type[SpecT], path: str | Path, overrides: list[str] = ()) -> SpecT:
    data = apply_overrides(read_yaml(path), list(overrides))
    return validate(model, data, str(path))


def describe_errors(exc: ValidationError) -> str:
    """pydantic's errors as `key.path: reason (got value)`, joined on one line."""
    parts = []
    for err in exc.errors(include_url=False):
        # Tagged unions put the tag into `loc`; it is not a key the user wrote.
        loc = [str(p) for p in err["loc"] if not _is_tag(p)]
        where = ".".join(loc) or "(top level)"
        reason = err["msg"]
        if err["type"] == "extra_forbidden":
            reason = "unknown key"
        elif err["type"] == "missing":
            reason = "required key is missing"
        elif "input" in err and not isinstance(err["input"], dict | list):
            reason = f"{reason} (got {err['input']!r})"
        parts.append(f"{where}: {reason}")
    return "; ".join(parts)


_TAGS: set[str] = set()


def register_tags(*tags: str) -> None:
    """Declare discriminator values so error paths leave them out."""
    _TAGS.update(tags)


def _is_tag(part: object) -> bool:
    return isinstance(part, str) and part in _TAGS


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
