"""Super-networks by kind, and rebuilding one from its checkpoint dict."""

from __future__ import annotations

from typing import Any

from actors.nas.fno import ElasticFNO
from actors.nas.mlp import ElasticMLP
from actors.nas.supernet import SuperNetwork

SUPERNETS: dict[str, type[SuperNetwork]] = {"mlp-digits": ElasticMLP, "fno": ElasticFNO}


def build_supernet(kind: str, arch: dict[str, Any]) -> SuperNetwork:
    if kind not in SUPERNETS:
        raise ValueError(f"unknown super-network kind {kind!r} (known: {', '.join(SUPERNETS)})")
    return SUPERNETS[kind](**arch)


def load_supernet(checkpoint: dict[str, Any]) -> SuperNetwork:
    """{"kind", "arch", "state_dict"} -> the trained super-network, in eval mode."""
    net = build_supernet(checkpoint["kind"], checkpoint["arch"])
    net.load_state_dict(checkpoint["state_dict"])
    return net.eval()
