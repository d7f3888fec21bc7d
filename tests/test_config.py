"""Config loading: defaults <- TOML <- overrides, with unknown keys named and the closest key suggested."""

from dataclasses import dataclass, field

import pytest

from llmlab.config import from_dict, load_config, to_toml
from llmlab.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Run:
    name: str = "run"
    steps: int = 10
    seed: int | None = None
    optim: Optim = field(default_factory=Optim)


def test_defaults_toml_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "a"\nsteps = 5\n[optim]\nlr = 1\n')
    cfg = load_config(Run, path, ["steps=7", "optim.betas=[0.8, 0.9]", "seed=3"])
    assert cfg == Run(name="a", steps=7, seed=3, optim=Optim(lr=1.0, betas=(0.8, 0.9)))


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"'optim.lrr'.*did you mean 'lr'"):
        load_config(Run, overrides=["optim.lrr=1"])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="steps"):
        from_dict(Run, {"steps": "many"})


def test_toml_round_trip(tmp_path):
    cfg = Run(name="x", steps=3, optim=Optim(lr=0.5))
    path = tmp_path / "r.toml"
    path.write_text(to_toml(cfg))
    assert load_config(Run, path) == cfg


def test_bare_string_override():
    assert load_config(Run, overrides=["name=hello"]).name == "hello"


def test_null_unsets_an_optional_key_and_is_refused_for_required_ones():
    assert load_config(Run, overrides=["seed=3", "seed=null"]).seed is None
    with pytest.raises(ConfigError, match="steps"):
        load_config(Run, overrides=["steps=null"])
