"""Checkpoint files: atomic format, one-line errors for corrupt files, config comparison, ``nfvi.load_model``."""

from __future__ import annotations

import pytest
import torch

import nfvi
from nfvi.errors import NfviError
from nfvi.vae import task as train_mod
from nfvi.vae.checkpoint import config_diff, flatten, load_checkpoint, load_model, save_checkpoint
from tests.test_train import cfg_of


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train_mod.train(cfg_of("trainer.steps=10", "trainer.val_every=5"), out)
    return out


def test_flatten_and_diff_ignore_resumable_keys():
    a = {
        "seed": 0,
        "trainer": {"steps": 10, "val_every": 5, "lr_decay": "none"},
        "flow": {"length": 2},
        "eval": {"x": 1},
    }
    b = {
        "seed": 1,
        "trainer": {"steps": 20, "val_every": 7, "lr_decay": "none"},
        "flow": {"length": 3},
        "eval": {"x": 2},
    }
    assert flatten(a)["trainer.steps"] == 10
    assert config_diff(a, b) == ["flow.length", "seed"]
    assert config_diff(a, a | {"new_key": 1}) == []  # keys added by a newer schema are not differences


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:200]), "is corrupt or unreadable"),
        (lambda p: p.write_bytes(b"\x00" * 64), "is corrupt or unreadable"),
        (lambda p: torch.save({"model": {}}, p), "is not an nfvi train checkpoint"),
        (lambda p: torch.save({"hello": object()}, p), "is corrupt or unreadable"),
    ],
    ids=["truncated", "zeros", "foreign", "pickled-object"],
)
def test_corrupt_checkpoint_is_a_one_line_error(tmp_path, run, damage, expected):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes((run / "checkpoint.pt").read_bytes())
    damage(path)
    with pytest.raises(NfviError) as err:
        load_checkpoint(path)
    assert expected in str(err.value) and "\n" not in str(err.value) and str(path) in str(err.value)


def test_resume_from_corrupt_checkpoint_is_refused(tmp_path, run):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes((run / "checkpoint.pt").read_bytes()[:500])
    with pytest.raises(NfviError, match="is corrupt or unreadable"):
        train_mod.train(cfg_of("trainer.steps=20", "resume=true"), tmp_path)


def test_save_is_atomic_and_versioned(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"step": 3, "config": {}, "model": {}})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind
    state = load_checkpoint(tmp_path / "c.pt")
    assert state["format"] == "nfvi-vae-checkpoint" and state["version"] == 1 and state["step"] == 3


def test_load_model_best_and_last(run):
    best = load_checkpoint(run / "best.pt")
    last = load_checkpoint(run / "checkpoint.pt")
    assert best["step"] in (5, 10) and last["step"] == 10
    for which, state in (("best", best), ("last", last)):
        model = load_model(run, which=which)
        assert not model.training
        assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())
    model = nfvi.load_model(run)
    x = torch.zeros(3, 784)
    z, log_q = model.posterior(x, 2)
    assert z.shape == (2, 3, 4) and log_q.shape == (2, 3)
    with pytest.raises(NfviError, match="holds no checkpoint.pt or best.pt"):
        load_model(run / "nowhere")
