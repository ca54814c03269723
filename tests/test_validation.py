"""Every config value is checked once, at the edge (``nfvi.config.validate``): one-line NfviError naming the key.

Each command's composed default config validates; each bad value is refused by the schema that owns it,
before the task runs. NaN and inf are tried on every float field of every schema (found by introspection,
so a new field is covered without editing this file).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import subprocess
import sys
import typing

import pytest
from omegaconf import OmegaConf

from nfvi.config import FLOW_KINDS, OPTIMIZERS, OptimConfig, validate
from nfvi.errors import NfviError, check_int_range, check_range
from tests.conftest import compose

SCHEMAS = {}  # command -> primary schema class, filled by _schemas()
REQUIRED = {"evaluate": ["run_dir=somewhere"]}  # the mandatory values of a command


def _schemas() -> dict[str, type]:
    if not SCHEMAS:
        from nfvi.cde.config import CDEConfig
        from nfvi.energy.config import EnergyConfig
        from nfvi.reports.task import ReportConfig
        from nfvi.vae.config import EvaluateConfig, TrainConfig

        SCHEMAS.update(energy=EnergyConfig, train=TrainConfig, evaluate=EvaluateConfig, cde=CDEConfig,
                       report=ReportConfig)  # fmt: skip
    return SCHEMAS


@functools.cache
def _default(command: str):
    return compose(command, REQUIRED.get(command, []))


def configured(command: str, **values):
    """The command's composed default config with ``values`` (dotted keys) set."""
    cfg = _default(command).copy()
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def refusal(cfg) -> str:
    with pytest.raises(NfviError) as info:
        validate(cfg)
    message = str(info.value)
    assert "\n" not in message and "is not allowed" in message, message
    return message


def float_keys(schema: type, prefix: str = "") -> list[str]:
    """Dotted keys of every float (or Optional[float]) field of ``schema`` and of the schemas nested in it."""
    keys = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            keys += float_keys(kind, f"{prefix}{f.name}.")
        elif kind is float or (typing.get_origin(kind) is typing.Union and float in typing.get_args(kind)):
            keys.append(prefix + f.name)
    return keys


FLOAT_CASES = [
    (command, key, value)
    for command in ("energy", "train", "evaluate", "cde", "report")
    for key in float_keys(_schemas()[command])
    for value in (math.nan, math.inf, -math.inf)
]


def test_float_fields_are_found():
    keys = {(c, k) for c, k, _ in FLOAT_CASES}
    assert {("energy", "trainer.beta0"), ("energy", "eval.box"), ("energy", "optim.lr"), ("train", "model.min_scale"),
            ("train", "flow.w_floor"), ("cde", "test_fraction")} <= keys  # fmt: skip


@pytest.mark.parametrize("command", ["energy", "train", "evaluate", "cde", "report"])
def test_default_config_validates(command):
    validate(_default(command))


@pytest.mark.parametrize("command, key, value", FLOAT_CASES, ids=[f"{c}-{k}={v}" for c, k, v in FLOAT_CASES])
def test_nan_and_inf_are_refused_naming_the_key(command, key, value):
    message = refusal(configured(command, **{key: value}))
    assert message.startswith(f"{key}={value!r} is not allowed; use "), message


BAD = [
    # command, {key: value}, fragment of the message
    ("energy", {"seed": -1}, "seed=-1 is not allowed; use a whole-number seed in [0, 4294967295]"),
    ("energy", {"seed": 2**32}, "seed=4294967296 is not allowed"),
    ("energy", {"target": "U9"}, "target='U9' is not allowed; choose one of: U1, U2, U3, U4"),
    ("energy", {"optim.lr": 0.0}, "optim.lr=0.0 is not allowed; use a positive learning rate in (0.0, 10.0]"),
    ("energy", {"optim.lr": 1000.0}, "optim.lr=1000.0 is not allowed"),
    ("energy", {"optim.eps": -1e-8}, "optim.eps=-1e-08 is not allowed"),
    ("energy", {"optim.weight_decay": -0.1}, "optim.weight_decay=-0.1 is not allowed"),
    ("energy", {"optim.momentum": 5.0}, "optim.momentum=5.0 is not allowed; use a momentum (rmsprop) in [0.0, 1.0)"),
    ("energy", {"optim.momentum": 1.0}, "optim.momentum=1.0 is not allowed"),
    ("energy", {"optim.momentum": -0.5}, "optim.momentum=-0.5 is not allowed"),
    ("energy", {"optim.name": "sgd"}, "optim.name='sgd' is not allowed; choose one of: rmsprop, adam, adamax"),
    ("energy", {"optim.flow_lr_factor": -1.0}, "optim.flow_lr_factor=-1.0 is not allowed"),
    ("energy", {"flow.kind": "spline"}, "flow='spline' is not allowed; choose one of: none, planar, radial, nice"),
    ("energy", {"flow.length": 100_000_000}, "flow.length=100000000 is not allowed; use a whole number of layers"),
    ("energy", {"flow.kind": "nice", "flow.hidden": 0}, "flow.hidden=0 is not allowed"),
    ("energy", {"flow.mix": "shuffle"}, "flow.mix='shuffle' is not allowed"),
    ("energy", {"flow.w_floor": -1.0}, "flow.w_floor=-1.0 is not allowed"),
    ("energy", {"trainer.samples": 10**7}, "trainer.samples=10000000 is not allowed"),
    ("energy", {"trainer.steps": 0}, "trainer.steps=0 is not allowed; use a whole number in [1, inf]"),
    ("energy", {"trainer.beta0": 2.0}, "trainer.beta0=2.0 is not allowed"),
    ("energy", {"trainer.lr_decay": "step"}, "trainer.lr_decay='step' is not allowed; choose one of: none, cosine"),
    ("energy", {"eval.samples": 10**9}, "eval.samples=1000000000 is not allowed"),
    ("energy", {"eval.grid": 10**6}, "eval.grid=1000000 is not allowed"),
    ("energy", {"eval.box": -1.0}, "eval.box=-1.0 is not allowed; use a positive half-width"),
    ("energy", {"wall": -0.1}, "wall=-0.1 is not allowed"),
    ("train", {"seed": -1}, "seed=-1 is not allowed"),
    ("train", {"eval.seed": 2**40}, "eval.seed=1099511627776 is not allowed"),
    ("train", {"dataset.split_seed": -3}, "dataset.split_seed=-3 is not allowed"),
    ("train", {"trainer.samples": 5000}, "trainer.samples=5000 is not allowed; use a whole number (trainer.samples"),
    ("train", {"trainer.batch_size": 10**6}, "trainer.batch_size=1000000 is not allowed"),
    ("train", {"trainer.batch_size": 0}, "trainer.batch_size=0 is not allowed"),
    ("train", {"trainer.annealing": "warm"}, "trainer.annealing='warm' is not allowed; choose one of: eq20, kl_warmup"),
    ("train", {"trainer.grad_clip": -1.0}, "trainer.grad_clip=-1.0 is not allowed"),
    ("train", {"threads": -1}, "threads=-1 is not allowed"),
    ("train", {"model.hidden": 10**6}, "model.hidden=1000000 is not allowed"),
    ("train", {"model.latent_dim": 0}, "model.latent_dim=0 is not allowed"),
    ("train", {"model.likelihood": "gaussian"}, "model.likelihood='gaussian' is not allowed"),
    ("train", {"model.activation": "tanh"}, "model=maxout needs model.activation=maxout"),
    ("train", {"flow.length": 100_000_000}, "flow.length=100000000 is not allowed"),
    ("train", {"eval.num_samples": 10**9}, "eval.num_samples=1000000000 is not allowed"),
    ("train", {"eval.batch_size": 0}, "eval.batch_size=0 is not allowed"),
    ("train", {"eval.checkpoint": "first"}, "eval.checkpoint='first' is not allowed; choose one of: best, last"),
    ("train", {"dataset.name": "svhn"}, "dataset='svhn' is not allowed"),
    ("train", {"dataset.name": "fake", "dataset.fake_size": 0}, "dataset.fake_size=0 is not allowed"),
    # known from the config alone: the likelihood must model the dataset's kind of data
    ("train", {"dataset.name": "cifar10", "dataset.binarize": "none", "dataset.valid_size": 5000},
     "model.likelihood=bernoulli is for binary data but dataset=cifar10 holds 8bit images"),
    ("evaluate", {"eval.num_samples": 0}, "eval.num_samples=0 is not allowed"),
    ("evaluate", {"eval.seed": -1}, "eval.seed=-1 is not allowed"),
    ("cde", {"seeds": [-1]}, "seeds=-1 is not allowed"),
    ("cde", {"seeds": [0, 2**32]}, "seeds=4294967296 is not allowed"),
    ("cde", {"seeds": []}, "seeds=[] is not allowed"),
    ("cde", {"seeds": [1, 1]}, "seeds=[1, 1] repeats a seed"),
    ("cde", {"optim.lr": 1000.0}, "optim.lr=1000.0 is not allowed"),
    ("cde", {"hidden": [0]}, "hidden=0 is not allowed"),
    ("cde", {"hidden": [100_000]}, "hidden=100000 is not allowed"),
    ("cde", {"dataset": "iris"}, "dataset='iris' is not allowed"),
    ("cde", {"model": "nn"}, "model='nn' is not allowed; choose one of: flow, gaussian, mdn"),
    ("cde", {"activation": "sigmoid"}, "activation='sigmoid' is not allowed"),
    ("cde", {"test_fraction": 0.95}, "test_fraction=0.95 is not allowed; use a fraction in [0.05, 0.9]"),
    ("cde", {"batch_size": 0}, "batch_size=0 is not allowed"),
    ("cde", {"flow.length": -1}, "flow.length=-1 is not allowed"),
    ("report", {"tasks": ["vae", "gan"]}, "report.tasks contains 'gan'; choose from: energy, vae, cde"),
]  # fmt: skip


@pytest.mark.parametrize("command, values, fragment", BAD, ids=[f"{c}-{'-'.join(v)}" for c, v, _ in BAD])
def test_bad_values_are_refused_in_one_line(command, values, fragment):
    with pytest.raises(NfviError) as info:
        validate(configured(command, **values))
    message = str(info.value)
    assert fragment in message and "\n" not in message, message


def test_good_edge_values_validate():
    validate(configured("energy", **{"optim.momentum": 0.0, "optim.eps": 0.0, "optim.lr": 10.0, "seed": 2**32 - 1}))
    validate(configured("train", **{"trainer.samples": 1000, "trainer.batch_size": 100, "flow.length": 1000}))
    validate(configured("cde", seeds=[0, 2**32 - 1]))
    validate(configured("energy", **{"flow.w_floor": None}))


def test_checks_refuse_nan_and_inf_unless_the_bound_is_infinite():
    assert isinstance(NfviError("x"), ValueError)  # library users catch it the usual way
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(NfviError, match="is not allowed"):
            check_range("x", value)
    check_range("x", math.inf, low=0.0, high=math.inf)  # explicitly allowed
    check_range("x", -math.inf, low=-math.inf)
    for value in (2.5, math.nan, True, "3"):
        with pytest.raises(NfviError, match=r"x=.* is not allowed; use a whole number in \[0, 9\]"):
            check_int_range("x", value, 0, 9)


def test_validate_unwraps_an_error_that_omegaconf_wrapped(monkeypatch):
    from omegaconf.errors import ValidationError

    def wrapped(cfg):
        try:
            raise NfviError("optim.lr=nan is not allowed; use a positive learning rate in (0.0, 10.0]")
        except NfviError as exc:
            raise ValidationError("Error while instantiating OptimConfig\n    full_key: optim") from exc

    monkeypatch.setattr(OmegaConf, "to_object", wrapped)
    with pytest.raises(NfviError) as info:
        validate(OmegaConf.create({}))
    assert str(info.value) == "optim.lr=nan is not allowed; use a positive learning rate in (0.0, 10.0]"


def test_schema_choices_match_the_factories():
    import torch

    from nfvi.flows import FLOW_KINDS as BUILT
    from nfvi.training import OPTIMIZERS as FACTORIES

    assert FLOW_KINDS == BUILT and tuple(FACTORIES) == OPTIMIZERS
    assert all(issubclass(cls, torch.optim.Optimizer) for cls in FACTORIES.values())
    assert OptimConfig().momentum < 1  # the defaults sit inside torch's ranges


def test_task_modules_trust_their_config():
    """The checks live in the schemas: task modules no longer call check_range / check_choice."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "nfvi"
    for module in ("energy/task.py", "vae/task.py", "vae/evaluate.py", "vae/objectives.py", "cde/task.py",
                   "training.py"):  # fmt: skip
        text = (root / module).read_text()
        assert "check_range(" not in text and "check_choice(" not in text, module


def _nfvi(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nfvi", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip


@pytest.mark.parametrize(
    "command, override, key",
    [("energy", "trainer.beta0=nan", "trainer.beta0=nan"), ("train", "optim.momentum=5", "optim.momentum=5.0")],
)
def test_cli_refuses_a_bad_value_in_one_line_before_writing(tmp_path, command, override, key):
    proc = _nfvi(command, override, f"hydra.run.dir={tmp_path / 'run'}", "device=cpu", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"nfvi {command}: error: {key} is not allowed; use "), lines[0]
    written = {p.name for p in (tmp_path / "run").iterdir()} if (tmp_path / "run").exists() else set()
    assert written <= {".hydra", f"{command}.log", "nfvi.log"}, written  # no results, metrics or checkpoints
