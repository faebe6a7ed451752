"""Job specs: overrides, and one-line errors that name the key path."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from flows.errors import UserError
from flows.preprocess import PreprocessSpec
from flows.spec import apply_overrides, load_spec, parse_override

DS = """
name: ds
samples: 16
simulation:
  pde: diffusion-sorption
  nx: 64
  nt: 11
"""


def write(tmp_path, text, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_override_parses_yaml_scalars_and_creates_nested_keys():
    assert parse_override("samples=64") == (["samples"], 64)
    assert parse_override("a.b=0.5") == (["a", "b"], 0.5)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("name=ns") == (["name"], "ns")
    data = apply_overrides({"a": {"b": 1}}, ["a.c=2", "d.e=x"])
    assert data == {"a": {"b": 1, "c": 2}, "d": {"e": "x"}}


def test_overrides_reach_the_validated_spec(tmp_path):
    spec = load_spec(PreprocessSpec, write(tmp_path, DS), ["samples=64", "simulation.nx=128"])
    assert spec.samples == 64 and spec.simulation.nx == 128
    assert spec.simulation.t_end == 500.0  # default filled in


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["samples=-3"], "samples: Input should be greater than or equal to 2 (got -3)"),
        (["samples=many"], "samples: Input should be a valid integer"),
        (["simulation.nxx=5"], "simulation.nxx: unknown key"),
        (["colour=red"], "colour: unknown key"),
        (["simulation.pde=heat"], "simulation: Input tag 'heat' found using 'pde' does not match"),
        (["simulation.initial_high=0"], "simulation.initial_high: Input should be greater than 0"),
        (["test_fraction=1.0"], "test_fraction: Input should be less than 1"),
        (["name=Bad Name"], "name: String should match pattern"),
    ],
)
def test_bad_values_name_the_key_path(tmp_path, overrides, message):
    with pytest.raises(UserError) as err:
        load_spec(PreprocessSpec, write(tmp_path, DS), overrides)
    text = str(err.value)
    assert text.startswith(str(tmp_path / "spec.yaml") + ": ")
    assert message in text
    assert "\n" not in text


def test_cross_field_rules(tmp_path):
    with pytest.raises(UserError, match="exactly one of 'simulation' or 'ingest'"):
        load_spec(PreprocessSpec, write(tmp_path, "name: x\nsamples: 4\n"))
    with pytest.raises(UserError, match="'samples' is required"):
        load_spec(PreprocessSpec, write(tmp_path, DS), ["samples=null"])
    ns = "name: ns\nsamples: 4\nsimulation: {pde: navier-stokes, resolution: 64}\n"
    with pytest.raises(UserError, match=r"sim_resolution \(96\) must be a multiple"):
        load_spec(PreprocessSpec, write(tmp_path, ns), ["simulation.sim_resolution=96"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: [unclosed", "not valid YAML"),
        ("- a\n- b\n", "a spec is a YAML mapping, got list"),
    ],
)
def test_unreadable_files(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        load_spec(PreprocessSpec, write(tmp_path, text))
    with pytest.raises(UserError, match="spec file not found"):
        load_spec(PreprocessSpec, tmp_path / "missing.yaml")


@pytest.mark.parametrize("bad", ["samples", "=3", "a..b=1"])
def test_malformed_overrides(bad):
    with pytest.raises(UserError, match="--set"):
        parse_override(bad)


def test_digest_follows_content():
    a = PreprocessSpec.model_validate(
        {"name": "a", "samples": 4, "simulation": {"pde": "diffusion-sorption"}}
    )
    b = a.model_copy(update={"samples": 5})
    assert a.digest() == a.model_copy().digest()
    assert a.digest() != b.digest()


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def shipped_spec_class(name: str):
    """The spec each shipped config is read as, by the command its header names."""
    from flows.nas import NASSpec
    from flows.pbt import PbtSpec
    from flows.quickstart import RunSpec
    from flows.train import TrainSpec

    prefix = name.split("-")[0]
    return {
        "preprocess": PreprocessSpec,
        "ingest": PreprocessSpec,
        "quickstart": RunSpec,
        "pbt": PbtSpec,
        "nas": NASSpec,
    }.get(prefix, TrainSpec)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_as_its_command_reads_it(path):
    spec = load_spec(shipped_spec_class(path.stem), path)
    assert spec.resolved()


def test_shipped_training_configs_are_what_their_names_say():
    """ds-/ns- x moe/hc/sc: the model kind, K = 4 experts for the MoE (one for PI-HC and
    PI-SC), and a data set that a shipped preprocessing config publishes, of that PDE."""
    from flows.train import TrainSpec

    published = {}
    for path in CONFIGS:
        if path.stem.startswith("preprocess-"):
            spec = load_spec(PreprocessSpec, path)
            published[spec.name] = spec.simulation.pde
    pdes = {"ds": "diffusion-sorption", "ns": "navier-stokes"}
    names = [p for p in CONFIGS if p.stem.split("-")[0] in pdes]
    assert sorted(p.stem for p in names) == [
        f"{pde}-{kind}" for pde in ("ds", "ns") for kind in ("hc", "moe", "sc")
    ]
    for path in names:
        pde, kind = path.stem.split("-")
        spec = load_spec(TrainSpec, path)
        assert spec.model.kind == kind, path.name
        assert math.prod(spec.model.splits) == (4 if kind == "moe" else 1), path.name
        assert published.get(spec.dataset) == pdes[pde], path.name
        assert spec.pde == pdes[pde], path.name  # and say so: another PDE's data is refused


def test_a_run_spec_whose_training_states_another_pde_than_it_simulates_is_refused(tmp_path):
    from flows.quickstart import RunSpec

    path = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    text = path.read_text().replace("\n  pde: diffusion-sorption", "\n  pde: navier-stokes")
    assert text != path.read_text()
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(UserError, match="train.pde is navier-stokes, but "
                       "preprocess.simulation.pde is diffusion-sorption"):  # fmt: skip
        load_spec(RunSpec, tmp_path / "run.yaml")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("train.dataset=ns-tiny", "train.dataset: 'ns-tiny', but physflow run trains on the "
                                  "data set it publishes ('ds-quickstart')"),
        ("train.dataset_version=v99", "train.dataset_version: 'v99', but physflow run trains"),
        ("preprocess.test_fraction=0", "preprocess.test_fraction: 0 leaves no test split"),
    ],
)  # fmt: skip
def test_a_run_spec_trains_on_what_it_publishes_and_tests_it(change, message):
    from flows.quickstart import RunSpec

    path = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    with pytest.raises(UserError, match=re.escape(message)):
        load_spec(RunSpec, path, [change])
    load_spec(RunSpec, path, ["train.dataset_version=v1"])  # the same version: fine
