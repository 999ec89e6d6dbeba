from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import pytest

from seekforge.configio import (
    atomic_write_text,
    from_dict,
    load_config,
    parse_override,
    save_config,
    to_dict,
)
from seekforge.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1


@dataclass
class Moe:
    n_experts: int = 8
    top_k: int = 2

    def __post_init__(self):
        if self.top_k > self.n_experts:
            raise ConfigError(f"top_k ({self.top_k}) exceeds n_experts ({self.n_experts})")


@dataclass
class Run:
    name: str
    steps: int = 100
    precision: Literal["bf16", "fp32", "fp8"] = "bf16"
    compile: bool = False
    optim: Optim = field(default_factory=Optim)
    moe: Moe | None = None
    layers: list[int] = field(default_factory=list)
    seed: int | None = None
    extra: dict[str, float] = field(default_factory=dict)


def test_from_dict_builds_nested_and_converts():
    run = from_dict(Run, {"name": "a", "optim": {"lr": 3, "betas": [0.8, 0.9]}, "moe": {"n_experts": 4},
                          "layers": [1, 2], "extra": {"x": 1}})
    assert run.optim.lr == 3.0 and isinstance(run.optim.lr, float)  # int accepted for float
    assert run.optim.betas == (0.8, 0.9) and isinstance(run.optim.betas, tuple)
    assert run.moe == Moe(n_experts=4, top_k=2)
    assert run.layers == [1, 2] and run.seed is None and run.extra == {"x": 1.0}
    assert to_dict(run) == {"name": "a", "steps": 100, "precision": "bf16", "compile": False,
                            "optim": {"lr": 3.0, "betas": [0.8, 0.9], "weight_decay": 0.1},
                            "moe": {"n_experts": 4, "top_k": 2}, "layers": [1, 2], "seed": None,
                            "extra": {"x": 1.0}}


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as err:
        from_dict(Run, {"name": "a", "stpes": 3}, where="run.yaml")
    msg = str(err.value)
    assert "run.yaml" in msg and "'stpes'" in msg and "did you mean 'steps'" in msg
    for key in ("name", "steps", "precision", "optim", "layers"):
        assert key in msg


def test_unknown_nested_key_names_full_path():
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr'.*did you mean 'optim\.lr'.*weight_decay"):
        from_dict(Run, {"name": "a", "optim": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match=r"unknown key 'moe\.topk'.*did you mean 'moe\.top_k'"):
        from_dict(Run, {"name": "a", "moe": {"topk": 1}})  # inside an Optional section


@pytest.mark.parametrize("data, pattern", [
    ({"name": "a", "steps": "10"}, r"key 'steps' expects int, got str \('10'\)"),
    ({"name": "a", "steps": 1.5}, r"key 'steps' expects int, got float"),
    ({"name": "a", "steps": True}, r"key 'steps' expects int, got bool"),
    ({"name": "a", "optim": {"lr": True}}, r"key 'optim\.lr' expects float, got bool"),
    ({"name": "a", "optim": {"lr": "fast"}}, r"key 'optim\.lr' expects float, got str"),
    ({"name": "a", "compile": 1}, r"key 'compile' expects bool, got int"),
    ({"name": 5}, r"key 'name' expects str, got int"),
    ({"name": "a", "layers": [1, "x"]}, r"key 'layers\[1\]' expects int, got str"),
    ({"name": "a", "optim": {"betas": [0.9]}}, r"key 'optim\.betas' expects tuple\[float, float\]"),
    ({"name": "a", "optim": 3}, r"key 'optim' expects Optim, got int"),
    ({"name": "a", "seed": "x"}, r"key 'seed' expects int, got str"),
    ({"name": "a", "extra": {"x": "y"}}, r"key 'extra\.x' expects float"),
])
def test_wrong_types_name_key_expected_and_got(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(Run, data, where="cfg.yaml")


def test_literal_checked_against_allowed_values():
    assert from_dict(Run, {"name": "a", "precision": "fp8"}).precision == "fp8"
    with pytest.raises(ConfigError, match=r"key 'precision' must be one of 'bf16', 'fp32', 'fp8', got str \('fp16'\)"):
        from_dict(Run, {"name": "a", "precision": "fp16"})


def test_missing_required_key_and_post_init_errors():
    with pytest.raises(ConfigError, match=r"missing required key\(s\) 'name'"):
        from_dict(Run, {"steps": 3})
    with pytest.raises(ConfigError, match=r"top_k \(9\) exceeds n_experts \(8\)"):
        from_dict(Run, {"name": "a", "moe": {"top_k": 9}})


def test_parse_override_uses_yaml_scalars():
    assert parse_override("optim.lr=3e-4") == (["optim", "lr"], 3e-4)
    assert parse_override("steps=100") == (["steps"], 100)
    assert parse_override("name=foo") == (["name"], "foo")
    assert parse_override("compile=true") == (["compile"], True)
    assert parse_override("layers=[1, 2]") == (["layers"], [1, 2])
    assert parse_override("seed=") == (["seed"], None)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("steps")


def test_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: base\nsteps: 10\noptim:\n  lr: 3e-4\n")
    run = load_config(Run, path, overrides=["steps=20", "optim.weight_decay=0", "moe.top_k=1", "name=foo"])
    assert run.optim.lr == 3e-4  # YAML 1.1 alone would read "3e-4" as a string
    assert (run.steps, run.optim.weight_decay, run.moe, run.name) == (20, 0.0, Moe(8, 1), "foo")


def test_override_errors_name_the_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: base\n")
    with pytest.raises(ConfigError, match=r"override 'optim\.lrr=1'.*did you mean 'optim\.lr'"):
        load_config(Run, path, overrides=["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"override 'steps=abc'.*key 'steps' expects int, got str"):
        load_config(Run, path, overrides=["steps=abc"])
    with pytest.raises(ConfigError, match=r"'steps' holds a value of type int, not a section; drop '\.x'"):
        load_config(Run, path, overrides=["steps.x=1"])


def test_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('name = "t"\nprecision = "fp32"\n[optim]\nlr = 2.2e-4\nbetas = [0.9, 0.95]\n')
    run = load_config(Run, path, overrides=["optim.lr=1e-3"])
    assert (run.name, run.precision, run.optim.lr, run.optim.betas) == ("t", "fp32", 1e-3, (0.9, 0.95))
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "t"\n[optim]\nlr = "x"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: key 'optim\.lr' expects float, got str"):
        load_config(Run, bad)


def test_builtins_and_unknown_source(tmp_path):
    builtins = {"tiny": {"name": "tiny", "steps": 5}, "small": Run(name="small", moe=Moe(16, 4))}
    assert load_config(Run, "tiny", builtins).steps == 5
    small = load_config(Run, "small", builtins, ["moe.top_k=2"])
    assert small.moe == Moe(16, 2) and builtins["small"].moe.top_k == 4  # the builtin is not mutated
    with pytest.raises(ConfigError, match=r"did you mean 'tiny'\?.*builtins are: small, tiny"):
        load_config(Run, "tiyn", builtins)
    with pytest.raises(ConfigError, match=r"config file '.*nope\.yaml' not found"):
        load_config(Run, str(tmp_path / "nope.yaml"), builtins)
    txt = tmp_path / "run.json"
    txt.write_text("{}")
    with pytest.raises(ConfigError, match=r"unknown config format '\.json'; use a \.yaml, \.yml or \.toml"):
        load_config(Run, txt)


def test_bad_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yml: not valid YAML"):
        load_config(Run, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Run, listy)


def test_save_config_round_trip_and_atomicity(tmp_path, monkeypatch):
    run = Run(name="r", steps=7, optim=Optim(lr=2.2e-5), moe=Moe(4, 1), layers=[3], extra={"a": 1e-8})
    path = save_config(run, tmp_path / "sub" / "run.yaml")
    assert load_config(Run, path) == run

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        save_config(Run(name="other"), path)
    monkeypatch.undo()
    assert load_config(Run, path) == run  # the old file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.yaml"]  # no temp file left
    assert atomic_write_text(tmp_path / "x.txt", "hi").read_text() == "hi"
