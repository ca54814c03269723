"""Experiment trackers (``logger=[tensorboard,wandb,mlflow]``, :mod:`nfvi.trackers`): each one, read back with its own
package, holds the scalars of ``metrics.csv`` at the same steps, the resolved config and the final results."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import struct
import sys
from pathlib import Path

import pytest

from nfvi.errors import NfviError
from tests.conftest import compose

ENERGY = ["trainer.steps=30", "trainer.log_every=10", "trainer.samples=32", "eval.samples=500", "eval.grid=20"]
ENERGY += ["flow.length=2", "device=cpu"]
INSTALLED = {name: importlib.util.find_spec(name) is not None for name in ("tensorboard", "wandb", "mlflow")}


def need(package: str):
    if not INSTALLED[package]:
        pytest.skip(f"{package} is not installed (pip install 'nfvi[trackers]')")


def csv_rows(run: Path) -> list[dict[str, float]]:
    """metrics.csv's rows, numeric fields as floats (empty fields left out)."""
    with (run / "metrics.csv").open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def energy_run(folder: Path, *overrides: str) -> dict:
    from nfvi.energy.task import run

    cwd = os.getcwd()
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)  # outside Hydra the run folder of energy is the working directory
    try:
        return run(compose("energy", [*ENERGY, *overrides]))
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def energy(tmp_path_factory):
    """One tiny energy run feeding every installed tracker: (run folder, results)."""
    names = [name for name, ok in INSTALLED.items() if ok]
    if not names:
        pytest.skip("no tracker package is installed (pip install 'nfvi[trackers]')")
    run = tmp_path_factory.mktemp("trackers") / "energy"
    results = energy_run(run, f"logger=[csv,{','.join(names)}]")
    return run, results


def numbers(results: dict) -> dict[str, float]:
    """results.json's numbers (bools aside) as the trackers name them."""
    kept = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {"kl", "bound", "log_z"} <= set(kept)
    return {f"results/{k}": float(v) for k, v in kept.items()}


def test_the_logger_group_selects_several_trackers_and_csv_is_always_on():
    cfg = compose("energy", ["logger=[tensorboard,mlflow]"])
    assert cfg.logger.csv is not None and cfg.logger.wandb is None
    assert cfg.logger.tensorboard.dir == "tensorboard" and cfg.logger.mlflow.tracking_uri is None
    default = compose("cde", [])
    assert default.logger.csv is not None and default.logger.tensorboard is None and default.logger.mlflow is None
    assert compose("train", ["logger=wandb", "logger.wandb.project=p"]).logger.wandb.project == "p"
    with pytest.raises(Exception, match="logger/foo"):
        compose("energy", ["logger=[foo]"])


def test_a_bad_wandb_mode_is_one_line():
    from nfvi.config import validate

    with pytest.raises(NfviError, match="logger.wandb.mode='cloud'"):
        validate(compose("energy", ["logger=[wandb]", "logger.wandb.mode=cloud"]))


def test_a_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    from nfvi.trackers import open_trackers

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    cfg = compose("energy", ["logger=[wandb]"])
    with pytest.raises(NfviError, match=r"logger=wandb needs the wandb package.*pip install 'nfvi\[trackers\]'"):
        open_trackers(cfg.logger, tmp_path)


def test_tensorboard_holds_the_rows_of_metrics_csv_the_config_and_the_results(energy):
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, results = energy
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    rows = csv_rows(run)
    for key in ("loss", "beta", "bound", "lr"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [int(r["step"]) for r in rows]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)
    for key, value in numbers(results).items():
        assert acc.Scalars(key)[-1].value == pytest.approx(value, rel=1e-6), key
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "target: U1" in config and "length: 2" in config
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")


def _wandb_records(path: Path):
    """The records of a W&B offline run file (``run-<id>.wandb``: a 7-byte header, then LevelDB-log-style blocks of
    32 KiB whose records are ``crc32c (4) | length (2, LE) | type (1) | data``; types 1 full, 2 first, 3 middle,
    4 last), parsed with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _items(items) -> dict:
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in items}


def test_wandb_offline_run_holds_the_rows_of_metrics_csv_the_config_and_the_results(energy):
    need("wandb")
    run, results = energy
    (path,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history, config, summary = [], {}, {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(_items(record.history.item))
        elif kind == "config":
            config.update(_items(record.config.update))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
    rows = csv_rows(run)
    assert [h["step"] for h in history] == [int(r["step"]) for r in rows]
    for key in ("loss", "beta", "bound", "lr", "elapsed_s"):
        assert [h[key] for h in history] == pytest.approx([r[key] for r in rows], rel=1e-6), key
    assert config["target"] == "U1" and config["flow"]["length"] == 2
    for key, value in numbers(results).items():
        assert summary[key] == pytest.approx(value, rel=1e-9), key


def test_mlflow_file_store_holds_the_rows_of_metrics_csv_the_config_and_the_results(energy):
    need("mlflow")
    from mlflow.tracking import MlflowClient

    run, results = energy
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("nfvi").experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == run.name
    rows = csv_rows(run)
    for key in ("loss", "beta", "bound", "lr"):
        history = client.get_metric_history(found.info.run_id, key)
        assert [m.step for m in history] == [int(r["step"]) for r in rows]
        assert [m.value for m in history] == pytest.approx([r[key] for r in rows], rel=1e-9)
    assert found.data.params["target"] == "U1" and found.data.params["flow.length"] == "2"
    for key, value in numbers(results).items():
        assert found.data.metrics[key] == pytest.approx(value, rel=1e-9), key


def test_train_and_cde_feed_the_trackers_too_and_logger_is_free_on_resume(tmp_path):
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nfvi.cde.task import run_cde
    from nfvi.vae import task as train_mod
    from tests.test_train import TINY

    train = compose("train", [*TINY, "trainer.steps=20", "eval.at_end=false", "logger=[tensorboard]"])
    train_mod.train(train, tmp_path / "train")
    cde = ["dataset=sine", "seeds=[0,1]", "max_epochs=2", "synthetic_size=200", "hidden=[8]", "logger=[tensorboard]"]
    results = run_cde(compose("cde", cde), tmp_path / "cde")
    for name, key in (("train", "train_neg_elbo"), ("train", "val_neg_elbo"), ("cde", "val_nll")):
        acc = EventAccumulator(str(tmp_path / name / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        rows = [r for r in csv_rows(tmp_path / name) if key in r]  # val_neg_elbo: validation rows only
        events = acc.Scalars(key)
        assert [e.step for e in events] == [int(r["step"]) for r in rows] and len(rows) >= 2, (name, key)
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6), (name, key)
    # the trackers see the numbers without changing them: another logger= may resume the finished run
    again = run_cde(compose("cde", [*cde[:-1], "logger=[csv]", "resume=true"]), tmp_path / "cde")
    assert again["test_nll_mean"] == results["test_nll_mean"]


def test_a_run_without_trackers_writes_no_tracker_folder(tmp_path):
    energy_run(tmp_path, "trainer.steps=10")
    assert {"metrics.csv", "results.json"} <= {p.name for p in tmp_path.iterdir()}
    assert not {"tensorboard", "wandb", "mlruns"} & {p.name for p in tmp_path.iterdir()}


def test_a_resumed_run_continues_its_tracker_runs(tmp_path):
    """A run resumed from an older checkpoint (killed after logging rows past it) continues its W&B and MLflow runs
    (one run each, keyed by the nfvi run id) and TensorBoard shows each step once, as metrics.csv does."""
    names = [name for name, ok in INSTALLED.items() if ok]
    if not names:
        pytest.skip("no tracker package is installed (pip install 'nfvi[trackers]')")
    import shutil

    from nfvi.vae import task as train_mod
    from tests.test_train import TINY

    out = tmp_path / "run"
    cfg = [*TINY, f"logger=[csv,{','.join(names)}]"]
    train_mod.train(compose("train", [*cfg, "trainer.steps=10"]), out)
    shutil.copy(out / "checkpoint.pt", tmp_path / "step10.pt")
    train_mod.train(compose("train", [*cfg, "trainer.steps=20", "resume=true"]), out)  # rows 15 and 20 sent
    shutil.copy(tmp_path / "step10.pt", out / "checkpoint.pt")  # as if killed before the checkpoint at 20
    (out / "results.json").unlink(missing_ok=True)
    train_mod.train(compose("train", [*cfg, "trainer.steps=20", "resume=true"]), out)
    rows = csv_rows(out)
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]
    run_id = json.loads((out / "run_config.json").read_text())["run_id"]
    if INSTALLED["tensorboard"]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        assert [e.step for e in acc.Scalars("train_neg_elbo")] == [5, 10, 15, 20]
    if INSTALLED["wandb"]:
        folders = sorted((out / "wandb").glob("offline-run-*"))
        named = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?")  # two in a second: "-<id>-1"
        assert len(folders) == 3 and all(named.fullmatch(f.name) for f in folders), [f.name for f in folders]
    if INSTALLED["mlflow"]:
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
        (found,) = client.search_runs([client.get_experiment_by_name("nfvi").experiment_id])
        assert found.data.tags["nfvi.run_id"] == run_id and found.info.status == "FINISHED"
        history = client.get_metric_history(found.info.run_id, "train_neg_elbo")
        assert {m.step for m in history} == {5, 10, 15, 20}


@pytest.mark.parametrize(
    "overrides, tracker",
    [(["logger.wandb.mode=online"], "wandb"), (["logger=[csv,tensorboard]", "logger.mlflow.experiment=x"], "mlflow")],
)
def test_a_key_of_an_unselected_tracker_is_one_line(tmp_path, monkeypatch, capsys, overrides, tracker):
    from tests.test_reliability import cli, one_error_line

    assert cli(tmp_path, monkeypatch, "energy", "trainer.steps=5", *overrides) == 2
    line = one_error_line(capsys)
    assert f"the {tracker} tracker is not selected" in line and f"logger=[csv,{tracker}]" in line
    assert list(tmp_path.iterdir()) == []  # refused before any folder was made
