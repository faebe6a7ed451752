"""`physflow submit` commands (registered on the main app by flows.cli)."""

from __future__ import annotations


def register(app, reports_errors, out, err) -> None:
    """Add this module's commands to `app`."""
