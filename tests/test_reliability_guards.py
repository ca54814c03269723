"""Issue 21, points 3, 4, 7 and 8: divergence is a failure, weights carry their run's identity, size bounds on the
whole, odd files and read-only run folders (tiny runs on fake data; docs/reliability.md maps each case here)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nfvi.errors import DivergenceError, NfviError, NonFiniteLossError
from nfvi.flows import build_flow
from nfvi.reports.task import run as report_run
from nfvi.training import check_divergence, divergence_limit
from nfvi.vae import evaluate as evaluate_mod
from nfvi.vae import task as train_mod
from nfvi.vae.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import compose
from tests.test_reliability import CDE, EVAL, cli, energy, one_error_line
from tests.test_train import TINY, cfg_of


def evaluate(run_dir, *overrides):
    return evaluate_mod.run(compose("evaluate", [f"run_dir={run_dir}", *EVAL, *overrides]))


def error_line(capsys) -> str:
    return one_error_line(capsys)


# -- 3. divergence is a failure ----------------------------------------------------------------------------------------
def test_divergence_limit_and_guard():
    assert divergence_limit(250.0, 784) == 250.0 + 10 * 784
    assert divergence_limit(-3000.0, 784) == -3000.0 + 10 * 3000  # a negative bound (densities): its magnitude
    check_divergence(8000.0, 250.0, 784, step=5)  # within the limit
    check_divergence(1e20, None, 784, step=5)  # no reference: only the non-finite guard
    with pytest.raises(DivergenceError, match=r"the training bound diverged at step 5: 8200 nats.*; stopping; kept"):
        check_divergence(8200.0, 250.0, 784, step=5, where="kept")
    with pytest.raises(NonFiniteLossError, match="became nan at step 3"):
        check_divergence(float("nan"), 250.0, 784, step=3)
    assert issubclass(NonFiniteLossError, DivergenceError) and DivergenceError.exit_status == 1


@pytest.mark.parametrize(
    "optim", [["optim.lr=10"], ["optim=rmsprop", "optim.momentum=0.999999", "optim.lr=10"]], ids=["adam", "rmsprop"]
)
def test_train_divergence_is_a_failed_run_exit_1_one_line_error_txt(tmp_path, monkeypatch, capsys, optim):
    """21.3: ``optim.lr=10`` gave exit 0, test -ELBO 2.1e14, ``finished: true`` and a row in ``nfvi report``."""
    run = tmp_path / "run"
    args = [*TINY, "trainer.steps=20", "eval.at_end=true", *optim, f"run_dir={run}"]
    assert cli(tmp_path, monkeypatch, "train", *args) == 1
    line = error_line(capsys)
    assert line.startswith("nfvi train: error: the training -ELBO diverged at step 5:") and "optim.lr" in line
    assert (run / "error.txt").read_text().startswith(line)
    assert not (run / "results.json").exists() and not (run / "checkpoint.pt").exists()  # nothing diverged is saved
    assert (run / "run_config.json").exists()  # the folder is kept (a failed run, not a refused one)


def test_divergence_after_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    """21.3: the guard works from the logged values (every trainer.log_every updates) and keeps the last checkpoint."""
    real, calls = train_mod.free_energy_terms, []

    def blowing_up(model, x, num_samples=1):  # from update 11 on, the bound is 1e6 times larger
        terms = real(model, x, num_samples=num_samples)
        calls.extend([1] if x.device.type != "meta" else [])  # not the size check's (nfvi.sizes)
        return {**terms, "elbo": terms["elbo"] * 1e6} if len(calls) > 10 else terms

    monkeypatch.setattr(train_mod, "free_energy_terms", blowing_up)
    with pytest.raises(DivergenceError, match=r"diverged at step 15: .*last good checkpoint \(step 10\) is kept"):
        train_mod.train(cfg_of("trainer.steps=30"), tmp_path)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 10
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 10
    assert not (tmp_path / "results.json").exists()


def test_evaluate_refuses_diverged_weights(tmp_path, monkeypatch, capsys):
    """21.3: a test -ELBO orders of magnitude above the run's first-update bound is an error, nothing written."""
    train_mod.train(cfg_of("trainer.steps=10"), tmp_path / "run")
    for name in ("checkpoint.pt", "best.pt"):  # weights blown up by a factor 1000, as a diverged run's
        state = load_checkpoint(tmp_path / "run" / name)
        state["model"] = {k: v * 1e3 if v.is_floating_point() else v for k, v in state["model"].items()}
        save_checkpoint(tmp_path / "run" / name, state)
    assert cli(tmp_path, monkeypatch, "evaluate", f"run_dir={tmp_path / 'run'}", *EVAL) == 1
    assert "the test -ELBO of" in error_line(capsys)
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "run" / "evaluations").exists()


def test_cde_divergence_is_a_failed_run(tmp_path, monkeypatch, capsys):
    """21.3: ``nfvi cde ... optim.lr=10`` reported test NLL 3.2e7 as a result."""
    run = tmp_path / "run"
    assert cli(tmp_path, monkeypatch, "cde", *CDE, "optim.lr=10", f"hydra.run.dir={run}") == 1
    assert "the best validation NLL (sine radial (K=4) seed 0, standardised) diverged" in error_line(capsys)
    assert (run / "error.txt").exists() and not (run / "results.json").exists()


def test_energy_mass_outside_the_box_is_warned_and_marked_in_the_report(tmp_path, caplog):
    """21.3: ``nfvi energy ... optim.lr=10`` printed "KL on the box 0.1646" with all of q_K outside the box."""
    (tmp_path / "run").mkdir()
    with caplog.at_level(logging.WARNING, logger="nfvi.energy"):
        results = energy(tmp_path / "run", "optim.lr=10")
    assert results["mass_outside_box"] > 0.05 and "of q_K's mass lies outside the box" in results["kl_warning"]
    assert "outside the box" in caplog.text
    assert json.loads((tmp_path / "run" / "results.json").read_text())["kl_warning"] == results["kl_warning"]
    report_run(_report_cfg(tmp_path / "run", tmp_path / "tables"))
    md = (tmp_path / "tables" / "energy.md").read_text()
    kl_table = md.split("## KL on the box")[1].split("##")[0]
    assert f"{results['kl']:.3f} §" in kl_table and "§ more than 5% of q_K's mass lies outside the box" in kl_table


def test_energy_inside_the_box_has_no_warning(tmp_path):
    (tmp_path / "run").mkdir()
    results = energy(tmp_path / "run")
    assert results["mass_outside_box"] <= 0.05 and "kl_warning" not in results


# -- 4. weights carry their run's identity -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three finished tiny runs: lr 1e-3 (``a``), lr 1e-2 (``lr``), seed 1 (``seed``), NICE (``nice``)."""
    root = tmp_path_factory.mktemp("identity")
    for name, extra in (
        ("a", []),
        ("lr", ["optim.lr=0.01"]),
        ("seed", ["seed=1"]),
        ("nice", ["flow=nice", "flow.hidden=8"]),
        ("twin", []),
    ):
        train_mod.train(cfg_of("trainer.steps=10", *extra), root / name)
    return root


def _copy_run(runs: Path, tmp_path: Path, name: str = "a") -> Path:
    target = tmp_path / name
    shutil.copytree(runs / name, target)
    return target


def test_checkpoints_record_the_run_id_and_full_config(runs):
    record = json.loads((runs / "a" / "run_config.json").read_text())
    for name in ("checkpoint.pt", "best.pt"):
        state = load_checkpoint(runs / "a" / name)
        assert state["run_id"] == record["run_id"] and len(record["run_id"]) == 32
        assert state["config"]["optim"] == record["optim"] and state["config"]["seed"] == record["seed"]
        assert state["reference_neg_elbo"] > 0  # the divergence guard's reference travels with the weights
    assert record["run_id"] != json.loads((runs / "twin" / "run_config.json").read_text())["run_id"]


@pytest.mark.parametrize(
    "donor, files, match",
    [
        ("lr", ["best.pt"], r"trained with optim.lr=0.01 but the run's record \(run_config.json\) has optim.lr=0.001"),
        ("seed", ["best.pt"], r"trained with seed=1 but .* has seed=0"),
        ("nice", ["best.pt", "checkpoint.pt"], r"checkpoint.pt is not of the run of this folder: .* flow.hidden"),
        ("twin", ["best.pt", "checkpoint.pt"], r"holds the weights of another run \(run id"),
    ],
    ids=["lr", "seed", "nice-both-files", "same-config-other-run"],
)
def test_evaluate_refuses_weights_of_another_run_naming_the_key(runs, tmp_path, donor, files, match):
    """21.4: weights copied in from another run were evaluated and labelled with this run's settings."""
    run = _copy_run(runs, tmp_path)
    for name in files:
        shutil.copy(runs / donor / name, run / name)
    with pytest.raises(NfviError, match=match):
        evaluate(run, "overwrite=true", "eval.update_results=true")
    assert not (run / "evaluations").exists() and not (run / "results.json").exists()


def test_resume_refuses_a_checkpoint_of_another_run(runs, tmp_path):
    run = _copy_run(runs, tmp_path)
    shutil.copy(runs / "twin" / "checkpoint.pt", run / "checkpoint.pt")
    with pytest.raises(NfviError, match=r"holds the weights of another run"):
        train_mod.train(cfg_of("trainer.steps=12", "resume=true"), run)


def test_resume_may_change_steps_and_overwrite_and_evaluate_accepts_it(runs, tmp_path):
    """What a resume may change (trainer.steps, cadence, overwrite) is not a different run."""
    run = _copy_run(runs, tmp_path)
    train_mod.train(cfg_of("trainer.steps=12", "trainer.log_every=2", "resume=true"), run)
    assert load_checkpoint(run / "checkpoint.pt")["config"]["trainer"]["steps"] == 12
    assert evaluate(run)[str(run)]["steps"] == 12
    fresh = tmp_path / "fresh"  # overwrite=true, then resume=true: refused before ("differs in overwrite")
    train_mod.train(cfg_of("trainer.steps=4", "overwrite=true"), fresh)
    assert train_mod.train(cfg_of("trainer.steps=6", "resume=true"), fresh)["steps"] == 6


def test_old_checkpoints_without_an_id_are_accepted_with_a_warning(runs, tmp_path, caplog):
    """An nfvi before run ids: the config alone is compared (documented in nfvi.vae.checkpoint)."""
    run = _copy_run(runs, tmp_path)
    for name in ("checkpoint.pt", "best.pt"):
        state = load_checkpoint(run / name)
        del state["run_id"], state["reference_neg_elbo"]
        save_checkpoint(run / name, state)
    record = json.loads((run / "run_config.json").read_text())
    del record["run_id"]
    (run / "run_config.json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="nfvi.checkpoint"):
        assert evaluate(run)[str(run)]["seed"] == 0
    assert "records no run id (an older nfvi); its config is checked only" in caplog.text
    shutil.copy(runs / "lr" / "best.pt", run / "best.pt")  # the config is still compared
    with pytest.raises(NfviError, match="optim.lr"):
        evaluate(run, "overwrite=true")


# -- 7. size bounds on the whole ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command, overrides, named",
    [
        ("train", ["model.hidden=16384", "model.layers=64"], "reduce model.hidden=16384, model.layers=64"),
        (
            "train",
            ["flow=sylvester", "flow.variant=householder", "flow.num_householder=16384", "flow.length=1000"],
            "reduce flow.length=1000, flow.num_householder=16384",
        ),
        (
            "train",
            ["flow=iaf", "flow.hidden=16384", "flow.num_hidden=16", "flow.length=1000"],
            "reduce flow.length=1000, flow.hidden=16384, flow.num_hidden=16",
        ),
        (
            "energy",
            ["flow=nice", "flow.hidden=16384", "flow.length=1000"],
            "reduce flow.length=1000, flow.hidden=16384",
        ),
        ("cde", ["dataset=sine", "synthetic_size=100", "hidden=[16384,16384,16384,16384]"], "reduce hidden=[16384,"),
    ],
    ids=["train-mlp", "train-sylvester", "train-iaf", "energy-nice", "cde-hidden"],
)
def test_a_config_too_large_for_the_machine_is_refused_in_one_line(
    tmp_path, monkeypatch, capsys, command, overrides, named
):
    """21.7: each passed validation key by key and died in the allocator (4 GB to 1 TB)."""
    monkeypatch.setattr("nfvi.sizes.available_memory", lambda device="cpu": 2 * 10**9)  # the same on every machine
    run = tmp_path / "run"
    fake = ["dataset=fake", "dataset.fake_size=200"] if command == "train" else []
    started = time.time()
    assert cli(tmp_path, monkeypatch, command, *fake, *overrides, f"hydra.run.dir={run}") == 2
    line = error_line(capsys)
    assert "of memory (" in line and "more than the 2 GB of cpu memory here" in line and named in line, line
    assert not run.exists()  # refused before anything was written
    assert time.time() - started < 60


def test_the_estimate_counts_the_parameters_exactly_and_passes_the_smoke_profiles():
    from nfvi.sizes import estimate, with_length
    from nfvi.vae.model import build_model
    from nfvi.vae.objectives import free_energy_terms

    for extra in (["flow=planar", "flow.length=7"], ["flow=nice", "flow.length=5"], ["flow=iaf", "flow.length=3"]):
        cfg = compose("train", [*TINY, *extra])

        def make(length, cfg=cfg):
            model = build_model(cfg.model, with_length(cfg.flow, length), 784)
            return model, lambda n: free_energy_terms(model, torch.zeros(n, 784))

        est = estimate(make, cfg.flow.length, 20)
        real = sum(p.numel() for p in build_model(cfg.model, cfg.flow, 784).parameters())
        assert est.parameters == real and est.activations is not None, extra
        assert 0 < est.bytes < 10**8


def test_build_flow_bounds_length_and_checks_options_as_the_cli():
    """21.7: ``build_flow("planar", dim=2, length=10**9)`` reached 19 GB of RSS; NaN/negative w_floor, NICE
    hidden=0 were accepted where the CLI refuses them."""
    started = time.time()
    with pytest.raises(ValueError, match=r"flow.length=1000000000 is not allowed; use .* in \[0, 1000\]"):
        build_flow("planar", dim=2, length=10**9)
    assert time.time() - started < 5
    with pytest.raises(ValueError, match="flow.w_floor=nan is not allowed"):
        build_flow("planar", 2, 2, context_dim=3, w_floor=float("nan"))
    with pytest.raises(ValueError, match=r"flow.w_floor=-1.0 is not allowed"):
        build_flow("planar", 2, 2, context_dim=3, w_floor=-1.0)
    with pytest.raises(ValueError, match=r"flow.hidden=0 is not allowed; use a layer width in \[1, 16384\]"):
        build_flow("nice", 4, 2, hidden=0)
    with pytest.raises(ValueError, match=r"flow.hidden=100000 is not allowed"):
        build_flow("iaf", 4, 2, hidden=100_000)
    assert build_flow("planar", 2, 2, context_dim=3, w_floor=None).length == 2  # None (off) and "auto" stay valid


# -- 8. odd files and read-only run folders ----------------------------------------------------------------------------
def _report_cfg(root: Path, out: Path, tasks=()):
    paths = SimpleNamespace(output_dir=str(root))
    return SimpleNamespace(search=[str(root)], out_dir=str(out), tasks=list(tasks), paths=paths)


@pytest.fixture
def energy_results(tmp_path):
    """A usable energy results.json (read from a finished tiny run)."""
    (tmp_path / "good").mkdir()
    energy(tmp_path / "good")
    return tmp_path / "good"


def test_report_skips_deep_fifo_device_and_oversized_files_with_one_warning_each(tmp_path, energy_results, caplog):
    """21.8: RecursionError on a 100,000-deep file, a hang on a FIFO, MemoryError on a symlink to /dev/zero."""
    root = tmp_path / "runs"
    root.mkdir()
    shutil.move(energy_results, root / "good")
    for name in ("deep", "fifo", "zero", "big"):
        (root / name).mkdir()
    (root / "deep" / "results.json").write_text("[" * 100_000 + "]" * 100_000)
    os.mkfifo(root / "fifo" / "results.json")
    (root / "zero" / "results.json").symlink_to("/dev/zero")
    with open(root / "big" / "results.json", "wb") as f:
        f.truncate(64 * 2**20)  # sparse: 64 MB of zeros
    with caplog.at_level(logging.WARNING, logger="nfvi.report"):
        written = report_run(_report_cfg(root, tmp_path / "tables"))
    assert list(written) == ["energy"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name, why in (
        ("deep", "nested too deeply"),
        ("fifo", "not a regular file (a FIFO)"),
        ("zero", "not a regular file (a character device via a symlink)"),
        ("big", "too large (67,108,864 bytes"),
    ):
        assert sum(f"skipping {root / name / 'results.json'}: {why}" in w for w in warnings) == 1, (name, warnings)


def test_report_follows_symlinked_run_folders_and_names_loops(tmp_path, energy_results, caplog):
    root = tmp_path / "runs"
    root.mkdir()
    (root / "linked").symlink_to(energy_results, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="nfvi.report"):
        report_run(_report_cfg(root, tmp_path / "tables"))
    csv = (tmp_path / "tables" / "energy.csv").read_text()
    assert "U1" in csv and ",1," in csv  # the linked run, once
    assert f"skipping {root / 'loop'}: a symlink to {root}, already searched" in caplog.text


def test_report_says_when_it_has_nothing_to_write(tmp_path, energy_results, monkeypatch, capsys):
    """21.8: ``tasks=[vae]`` with nothing usable wrote nothing and said nothing."""
    out = tmp_path / "tables"
    status = cli(tmp_path, monkeypatch, "report", f"search=[{energy_results}]", f"out_dir={out}", "tasks=[vae]")
    assert status == 2
    line = error_line(capsys)
    assert "nothing to write: no usable results.json of tasks=['vae']" in line and "usable runs there are of energy"
    assert not out.exists()


def _read_only(monkeypatch, folder: Path):
    """Simulate a read-only file system under ``folder``: opening a file there for writing, creating one or a
    folder raises EROFS. (The tests run as root, for whom ``chmod`` does not block writes, and a read-only bind
    mount is not available: so the open calls are patched, at the OS level and in ``logging``.)"""
    import builtins
    import io

    folder = os.path.realpath(folder)

    def inside(path) -> bool:
        return isinstance(path, str | os.PathLike) and os.path.realpath(os.fspath(path)).startswith(folder)

    def erofs(path):
        return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def open_(file, mode="r", *args, **kwargs):
        if inside(file) and any(c in mode for c in "wax+"):
            raise erofs(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise erofs(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if inside(path):
            if os.path.isdir(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
            raise erofs(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(logging.FileHandler, "_builtin_open", open_, raising=False)


@pytest.fixture
def hydra_logging():
    """These tests let Hydra configure its job logging (its log file is what fails): put the logging set-up back
    afterwards, so that no handler bound to this test's captured stderr outlives it."""
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    saved = {id(lg): (lg, lg.handlers[:], lg.level, lg.disabled, lg.propagate) for lg in loggers}
    yield
    for lg, handlers, level, disabled, propagate in saved.values():
        for handler in lg.handlers:
            if handler not in handlers:
                handler.close()
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.disabled, lg.propagate = disabled, propagate


@pytest.mark.parametrize("command", ["train", "energy", "cde"])
def test_resuming_on_a_read_only_file_system_is_one_line(tmp_path, monkeypatch, capsys, hydra_logging, command):
    """21.8: a traceback from Hydra's logging set-up (its log file cannot be opened). Simulated (see _read_only)."""
    from tests.test_reliability import ENERGY

    run = tmp_path / "run"
    args = {
        "train": [*TINY, "trainer.steps=2", f"run_dir={run}"],
        "energy": [*ENERGY, f"hydra.run.dir={run}"],
        "cde": [*CDE, f"hydra.run.dir={run}"],
    }[command]
    import nfvi.cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["nfvi"])
    with pytest.raises(SystemExit) as first:  # a finished run, with Hydra's job logging (a log file in the folder)
        nfvi.cli.main([command, *args])
        raise SystemExit(0)
    assert first.value.code == 0
    capsys.readouterr()
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    _read_only(monkeypatch, run)
    with pytest.raises(SystemExit) as second:
        nfvi.cli.main([command, *args, "resume=true"])
    assert second.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"nfvi {command}: error: cannot write {run}") and "read-only" in lines[0], lines[0]
    monkeypatch.undo()
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before


def test_on_a_gpu_the_bound_is_its_memory(monkeypatch):
    """The device's own memory bounds the estimate (a GPU's total; no GPU here: its properties are patched)."""
    from nfvi import sizes

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=10**6))
    assert sizes.available_memory("cuda:0") == 10**6

    def make(length):
        flow = build_flow("nice", 4, length, hidden=256)
        return flow, lambda n: flow(torch.zeros(n, 4))

    assert sizes.check_memory("energy", make, 2, 8, {}, "cpu").parameters > 0
    with pytest.raises(NfviError, match=r"more than the 1 MB of cuda memory here; reduce flow.hidden=256"):
        sizes.check_memory("energy", make, 40, 8, {"flow": {"flow.hidden": 256}}, "cuda:0")
