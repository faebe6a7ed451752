"""`benchmarks.gpu`, the torch-only benchmark for machines with a GPU, checked at its tiny
size on the CPU: it trains both kinds, and what it reports is consistent with itself."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu


def test_tiny_run_reports_consistent_figures(capsys):
    result = gpu.main(["--tiny", "--steps", "6", "--device", "cpu"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result and result["device"] == "cpu"
    # from the unrounded times; the printed ones are rounded to 0.1 ms
    assert result["step_speedup_moe_vs_hc"] == pytest.approx(
        result["step_s_hc"] / result["step_s_moe"], rel=2e-2
    )
    for kind in ("hc", "moe"):
        assert 0 < result[f"overhead_fraction_{kind}"] < 1  # the experts did part of it
        assert result[f"lm_iterations_{kind}"] >= 0
    assert result["batched_experts_speedup"] == pytest.approx(
        result["step_s_moe_sequential"] / result["step_s_moe"], rel=2e-2
    )


def test_the_batched_and_the_sequential_moe_train_alike():
    """What the batched-experts speed-up compares: the same training, step for step."""
    losses = []
    for batched in (True, False):
        trainer = gpu.Trainer("moe", gpu.TINY, "cpu", "float64", batched=batched)
        trainer.train(4, 800)
        assert trainer.model.executor.inner.batched is batched
        losses.append(trainer.loss)
    assert losses[0] == pytest.approx(losses[1], rel=1e-9)


def test_the_experts_timed_in_step_are_the_in_process_ones():
    """The timing wrapper changes nothing: the same loss and gradients as the model's own
    in-process experts."""
    grads = []
    for wrap in (True, False):
        torch.manual_seed(0)
        model = gpu.build("moe", gpu.TINY, "cpu")
        if not wrap:
            model.executor = model.executor.inner
        initial = torch.full((2, gpu.TINY["nx"]), 0.1)
        loss, _, _ = model.loss(initial, torch.Generator().manual_seed(1))
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if wrap:
            assert model.executor.seconds > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "args, message",
    [(["--steps", "2"], "--steps: at least 3"), (["--device", "cuda"], "torch sees no GPU")],
)
def test_mistakes_are_one_line(args, message, capsys):
    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as stop:
        gpu.main(["--tiny", *args])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_it_needs_nothing_but_torch_and_numpy():
    """GPU machines lent for a short check have torch, not the services' clients."""
    import subprocess
    import sys

    check = (
        "import sys, benchmarks.gpu; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'ray', 'mlflow', 'dask', 'distributed', 'pydantic', 's3fs', 'pyarrow', 'yaml'}))"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_training_on_and_scoring_report_the_saved_models_test_error(tmp_path):
    """--until trains the MoE on after its timed steps and scores it: the saved weights,
    scored again here on the same simulated solutions, give the reported error."""
    saved = tmp_path / "moe.pt"
    result = gpu.main(
        ["--tiny", "--steps", "6", "--device", "cpu", "--until", "30", "--test-samples", "3",
         "--save", str(saved)]
    )  # fmt: skip
    assert result["train_steps"] > 6 and result["test_samples"] == 3
    # a fifth of the steps planned to fit, which the deadline may have cut short
    assert result["lr_halve_every"] >= max(result["train_steps"] // 5, 1)
    model = gpu.build("moe", gpu.TINY, "cpu")
    model.load_state_dict(torch.load(saved))
    initial, truth = gpu.test_set(gpu.TINY, 3)
    assert torch.equal(initial, truth[:, 0].float())  # each starts from its t = 0 level
    errors = gpu.relative_l2(model, initial, truth)
    assert round(float(errors.mean()), 4) == result["rel_l2_moe"] and 0 < errors.mean() < 1


def test_the_schedule_is_the_training_jobs():
    import yaml

    from flows.train import TrainSpec, learning_rate

    training = TrainSpec.model_validate(yaml.safe_load(open("configs/ds-moe.yaml"))).training
    for step in (0, 49, 99, 100, 799, 800, 2500, 3999):
        assert gpu.learning_rate(step, training.lr_halve_every) == pytest.approx(
            learning_rate(training, step)
        )
