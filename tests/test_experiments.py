"""The experiment runner: overrides, errors, and the quickstart main job end to end."""

from __future__ import annotations

import dataclasses
import math

import pytest

from experiments import overrides, quickstart
from experiments.__main__ import available, main
from model import RematPolicy
from tests.conftest import tiny_config


def test_overrides_convert_types_and_nest():
    cfg = overrides.apply(
        tiny_config(), ["d_model=64", "remat=full", "moe.top_k=3", "mla.q_lora_rank=none"]
    )
    assert cfg.d_model == 64 and cfg.remat is RematPolicy.FULL
    assert cfg.moe.top_k == 3 and cfg.mla.q_lora_rank is None


def test_overrides_parse_tuples():
    @dataclasses.dataclass(frozen=True)
    class C:
        seeds: tuple[int, ...] = (0,)

    assert overrides.apply(C(), ["seeds=3,4,5"]).seeds == (3, 4, 5)
    with pytest.raises(ValueError, match="expected int"):
        overrides.apply(C(), ["seeds=1,x"])


def test_overrides_parse_mappings():
    @dataclasses.dataclass(frozen=True)
    class C:
        require: dict[str, float] = dataclasses.field(default_factory=dict)

    got = overrides.apply(C(), ["require=accuracy:1,reward_model:0.5"]).require
    assert got == {"accuracy": 1.0, "reward_model": 0.5}
    with pytest.raises(ValueError, match="name:value"):
        overrides.apply(C(), ["require=accuracy"])
    with pytest.raises(ValueError, match="expected float"):
        overrides.apply(C(), ["require=accuracy:high"])


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("nope=1", "unknown field 'nope'"),
        ("d_model=wide", "expected int"),
        ("remat=sometimes", "expected one of"),
        ("d_model", "key=value"),
        ("moe.top_k=99", r"--set moe\.top_k=99: MoEConfig\.top_k"),  # the config's own checks
    ],
)
def test_bad_overrides_name_the_problem(assignment, message):
    with pytest.raises(ValueError, match=message):
        overrides.apply(tiny_config(), [assignment])


def test_type_errors_from_post_init_name_the_field(tmp_path, capsys):
    @dataclasses.dataclass(frozen=True)
    class Inner:
        limit: int | None = 1

        def __post_init__(self):
            if self.limit > 0:  # TypeError for None: a check that forgot the None case
                pass

    @dataclasses.dataclass(frozen=True)
    class Outer:
        inner: Inner = Inner()

    with pytest.raises(
        ValueError, match=r"--set inner\.limit=none: invalid value for Inner\.limit"
    ):
        overrides.apply(Outer(), ["inner.limit=none"])
    path = tmp_path / "toy.py"
    path.write_text(
        "import dataclasses\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class C:\n    x: int | None = 1\n"
        "    def __post_init__(self):\n        assert self.x < 5 or True\n"
        "def get_config():\n    return C()\n"
        "def run(config, run_dir):\n    return {}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), "--set", "x=none"])
    assert exit_info.value.code == 2  # argparse's error exit, not a traceback
    assert "error: --set x=none: invalid value for C.x" in capsys.readouterr().err


def test_experiment_list_and_unknown_name(capsys):
    assert "quickstart" in available()
    assert main([]) == 0
    assert "quickstart" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["no-such-experiment"])
    with pytest.raises(SystemExit):
        main(["quickstart", "--set", "nope=1"])
    with pytest.raises(SystemExit):
        main(["missing/file.py"])


def test_experiment_from_a_path_with_a_sweep(tmp_path, capsys):
    path = tmp_path / "toy.py"
    path.write_text(
        "import dataclasses\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class C:\n    x: int = 1\n    y: float = 0.5\n"
        "def get_config():\n    return C()\n"
        "def get_sweep():\n    return {'a': ['x=2'], 'b': ['x=3', 'y=1.5']}\n"
        "def run(config, run_dir):\n"
        "    run_dir.mkdir(parents=True)\n"
        "    return {'product': config.x * config.y}\n"
    )
    assert main([str(path), "--run-dir", str(tmp_path / "out"), "--sweep", "--set", "y=2"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "out" / "a").is_dir() and (tmp_path / "out" / "b").is_dir()
    assert "4" in out.splitlines()[-2] and "4.5" in out.splitlines()[-1]


def test_quickstart_config_validates():
    with pytest.raises(ValueError, match="valid presets"):
        dataclasses.replace(quickstart.get_config(), model="v9")
    with pytest.raises(ValueError, match="batch"):
        dataclasses.replace(quickstart.get_config(), batch=0)


def test_quickstart_runs_on_a_generated_batch(capsys):
    config = dataclasses.replace(quickstart.get_config(), model="v2lite-tiny", batch=2, seq_len=16)
    result = quickstart.run(config, None)
    out = capsys.readouterr().out
    assert math.isfinite(result["loss"]) and result["grad_norm"] > 0
    # Random init: cross-entropy close to ln(vocab); every preset's count printed.
    assert "v3-671b      total 671.03B" in out
