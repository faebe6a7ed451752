"""Validating one sub-network: what an evaluator actor runs, and what tests run in-process.

`SubnetEvaluator` holds a trained super-network and a fixed validation subset. Per
sub-network it reports the validation metric (one pass over the subset with the activated
sub-network), params and MACs (counted), and — only when an objective needs it — latency of
the extracted standalone sub-network at the spec's batch size on this evaluator's device.
`SyntheticEvaluator` sleeps for a given time instead: it measures the pool itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from actors.nas.checkpoint import load_supernet
from actors.nas.latency import LatencyOptions, measure_latency
from actors.nas.space import Config
from actors.nas.supernet import inference


@dataclass
class EvaluatorSetup:
    """Everything an evaluator needs, shipped once to each actor."""

    checkpoint: dict[str, Any]
    inputs: Tensor  # the validation subset
    targets: Tensor
    latency: LatencyOptions
    measure_latency: bool


class SubnetEvaluator:
    def __init__(self, setup: EvaluatorSetup, device: str = "cpu"):
        self.device = torch.device(device)
        self.net = load_supernet(setup.checkpoint).to(self.device)
        self.inputs = setup.inputs.to(self.device)
        self.targets = setup.targets.to(self.device)
        self.setup = setup

    def evaluate(self, config: Config) -> dict[str, float]:
        net = self.net.activate(config)
        output = inference(net, self.inputs, net.eval_chunk)
        result = {net.metric: net.metric_value(output, self.targets), **net.count(config)}
        if self.setup.measure_latency:
            sub = net.extract(config).to(self.device).eval()
            batch = net.example_input(self.inputs, self.setup.latency.batch_size)
            median, iqr = measure_latency(lambda: sub(batch), self.setup.latency, self.device)
            result.update(latency_ms=median, latency_iqr_ms=iqr)
        return result


class SyntheticEvaluator:
    """Sleeps `config["sleep_ms"]`; raises when `config["fail"]` is set."""

    def __init__(self, setup: Any = None, device: str = "cpu"):
        self.device = device

    def evaluate(self, config: Config) -> dict[str, float]:
        if config.get("fail"):
            raise RuntimeError(f"synthetic failure for {config}")
        time.sleep(config["sleep_ms"] / 1000)
        return {"sleep_ms": float(config["sleep_ms"])}
