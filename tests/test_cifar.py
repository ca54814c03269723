"""CIFAR-10 data path (nfvi.data.cifar): a tiny fake archive in torchvision's format, served from 127.0.0.1 or
placed in the root (never the internet); fetch, md5 checks, atomic extraction, one-line errors; patches; the
generated stand-in; the configs; scripts/reproduce_cifar10.sh offline."""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import socket
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10

from nfvi.config import hydra_version_base
from nfvi.data import COLOR_DATASETS, DatasetConfig, load_dataset, sources
from nfvi.data import cifar as cifar_mod
from tests.conftest import CONF_DIR, REPO, one_line_error, table_cells

PER_BATCH = 6  # images per fake batch file: 30 train, 6 test
BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """The CIFAR-10 URL points at a closed local port unless a test serves the archive itself."""
    monkeypatch.setitem(sources.URLS, "cifar10", {cifar_mod.ARCHIVE: f"http://127.0.0.1:{closed_port()}/c.tgz"})
    monkeypatch.delenv(cifar_mod.MIRROR_ENV, raising=False)


def fake_batches(seed: int = 0) -> dict[str, bytes]:
    """The pickled batch files of a tiny CIFAR-10 (rows: 1024 R, 1024 G, 1024 B values, as upstream)."""
    rng = np.random.default_rng(seed)
    files = {}
    for name in [*BATCHES, "test_batch"]:
        data = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        entry = {"batch_label": name, "labels": rng.integers(0, 10, PER_BATCH).tolist(), "data": data}
        files[name] = pickle.dumps(entry, protocol=2)
    files["batches.meta"] = pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}, protocol=2)
    return files


def tar_gz(files: dict[str, bytes], folder: str = cifar_mod.FOLDER) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def fake_cifar(monkeypatch):
    """A tiny CIFAR-10: its batch files and archive, with torchvision's md5 tables pointed at them."""
    files = fake_batches()
    archive = tar_gz(files)
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5(files[n])] for n in BATCHES])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5(files["test_batch"])]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(files["batches.meta"])})
    monkeypatch.setattr(CIFAR10, "tgz_md5", md5(archive))
    rows = {k: pickle.loads(v)["data"] for k, v in files.items() if k != "batches.meta"}
    return {"files": files, "archive": archive, "train": np.concatenate([rows[b] for b in BATCHES]),
            "test": rows["test_batch"]}  # fmt: skip


@pytest.fixture
def serve(monkeypatch, http_server):
    """``serve(body, length=None)``: serve an archive on 127.0.0.1 and point the CIFAR-10 URL at it."""

    def setup(body: bytes, length: int | None = None) -> str:
        url = http_server.add("/cifar/cifar-10-python.tar.gz", body, length=length)
        monkeypatch.setitem(sources.URLS, "cifar10", {cifar_mod.ARCHIVE: url})
        return url

    return setup


def cfg(name="cifar10", **kw) -> DatasetConfig:
    defaults = {
        "cifar10": {"binarize": "none", "valid_size": 10},
        "cifar10_patches": {"binarize": "none", "valid_size": 10, "patch_size": 8},
        "fake_cifar10": {"binarize": "none", "fake_size": 12},
    }
    return DatasetConfig(name=name, **{**defaults[name], **kw})


def rows_of(t: torch.Tensor) -> set[bytes]:
    return {bytes(r) for r in t.numpy()}


# ---------------------------------------------------------------- fetching, checking, extracting


def test_archive_is_fetched_checked_extracted_then_read_offline(tmp_path, monkeypatch, fake_cifar, serve):
    serve(fake_cifar["archive"])
    root = tmp_path / "data"
    data = load_dataset(cfg(), root)
    assert sorted(p.name for p in root.iterdir()) == sorted([cifar_mod.ARCHIVE, cifar_mod.FOLDER])  # no temp files
    assert data.kind == "8bit" and not data.dynamic and data.image_shape == (3, 32, 32) and data.num_dims == 3072
    assert (len(data.train), len(data.valid), len(data.test)) == (20, 10, 6)
    assert data.train.dtype == torch.uint8 and data.train.shape[1] == 3072
    # the flat rows are the upstream rows (channel-major), the carve keeps every training image exactly once
    assert rows_of(data.train) | rows_of(data.valid) == rows_of(torch.from_numpy(fake_cifar["train"]))
    assert not rows_of(data.train) & rows_of(data.valid)
    assert torch.equal(data.test, torch.from_numpy(fake_cifar["test"]))
    assert data.source == str(root / cifar_mod.FOLDER)
    monkeypatch.setitem(sources.URLS, "cifar10", {cifar_mod.ARCHIVE: f"http://127.0.0.1:{closed_port()}/x"})
    again = load_dataset(cfg(), root)  # no network needed any more
    assert torch.equal(again.train, data.train) and torch.equal(again.valid, data.valid)
    assert abs(float(data.pixel_mean().mean()) - float(data.train.double().mean() / 255)) < 1e-6


def test_archive_placed_in_the_root_is_used_without_network(tmp_path, fake_cifar):
    root = tmp_path / "data"
    root.mkdir()
    (root / cifar_mod.ARCHIVE).write_bytes(fake_cifar["archive"])
    data = load_dataset(cfg(valid_size=0), root)
    assert len(data.train) == 30 and len(data.valid) == 0
    assert (root / cifar_mod.FOLDER / "test_batch").is_file()


def test_mirror_environment_variable(tmp_path, monkeypatch, fake_cifar, serve):
    url = serve(fake_cifar["archive"])
    monkeypatch.setitem(sources.URLS, "cifar10", {cifar_mod.ARCHIVE: f"http://127.0.0.1:{closed_port()}/x"})
    monkeypatch.setenv(cifar_mod.MIRROR_ENV, url)
    assert cifar_mod.ensure_cifar10(tmp_path).name == cifar_mod.FOLDER


@pytest.mark.parametrize("failure", ["truncated", "corrupted", "offline", "not-gzip"])
def test_failed_fetch_gives_one_line_and_leaves_nothing(tmp_path, fake_cifar, serve, failure):
    body = fake_cifar["archive"]
    if failure == "truncated":
        url = serve(body, length=len(body) + 1000)
    elif failure == "corrupted":
        url = serve(body[:-10] + b"0123456789")
    elif failure == "not-gzip":
        url = serve(b"<html>captive portal</html>")
    else:
        url = sources.URLS["cifar10"][cifar_mod.ARCHIVE]
    root = tmp_path / "data"
    message = one_line_error(load_dataset, cfg(), root)
    assert cifar_mod.ARCHIVE in message and url in message and "NFVI_DATA" in message
    assert {"truncated": "truncated", "corrupted": "md5", "not-gzip": "md5", "offline": "refused"}[failure] in message
    assert list(root.iterdir()) == []  # no partial archive, no temporary file, no folder


def test_archive_with_the_right_md5_but_wrong_contents_leaves_no_folder(tmp_path, monkeypatch, fake_cifar):
    files = dict(fake_cifar["files"])
    del files["data_batch_3"]
    archive = tar_gz(files)
    monkeypatch.setattr(CIFAR10, "tgz_md5", md5(archive))
    (tmp_path / cifar_mod.ARCHIVE).write_bytes(archive)
    message = one_line_error(load_dataset, cfg(), tmp_path)
    assert "data_batch_3" in message and "delete it" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [cifar_mod.ARCHIVE]


def test_present_archive_with_another_md5_is_not_replaced(tmp_path, fake_cifar):
    (tmp_path / cifar_mod.ARCHIVE).write_bytes(b"something else")
    message = one_line_error(load_dataset, cfg(), tmp_path)
    assert "md5" in message and "delete it" in message
    assert (tmp_path / cifar_mod.ARCHIVE).read_bytes() == b"something else"


def test_corrupted_extracted_folder_is_reported(tmp_path, fake_cifar):
    folder = tmp_path / cifar_mod.FOLDER
    folder.mkdir()
    for name, body in fake_cifar["files"].items():
        (folder / name).write_bytes(body)
    assert len(load_dataset(cfg(), tmp_path).test) == PER_BATCH  # torchvision accepts the folder
    (folder / "data_batch_2").write_bytes(fake_cifar["files"]["data_batch_2"][:-5])
    message = one_line_error(load_dataset, cfg(), tmp_path)
    assert "data_batch_2" in message and str(folder) in message and "md5" in message


def test_check_command_offline_and_ready(tmp_path, fake_cifar, capsys):
    assert cifar_mod.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and "CIFAR-10 is not in" in out
    (tmp_path / cifar_mod.ARCHIVE).write_bytes(fake_cifar["archive"])
    assert cifar_mod.main([str(tmp_path)]) == 0
    assert "ready" in capsys.readouterr().out


def test_reproduce_script_skips_cifar10_offline_in_one_line(tmp_path):
    env = {**os.environ, "NFVI_DATA": str(tmp_path / "empty"), "OMP_NUM_THREADS": "1",
           cifar_mod.MIRROR_ENV: f"http://127.0.0.1:{closed_port()}/cifar-10-python.tar.gz",
           "PATH": f"{Path(__import__('sys').executable).parent}:{os.environ.get('PATH', '')}"}  # fmt: skip
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "reproduce_cifar10.sh"), "smoke", str(out)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "CIFAR-10 skipped" in lines[0] and "NFVI_DATA" in lines[0]
    assert not out.exists() or not any(out.rglob("results.json"))
    bad = subprocess.run(["bash", str(REPO / "scripts" / "reproduce_cifar10.sh"), "huge"], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "smoke, quick, paper" in bad.stderr


# ---------------------------------------------------------------- patches, the generated stand-in, configs


def test_patches_are_fixed_random_crops_of_each_split(tmp_path, fake_cifar):
    (tmp_path / cifar_mod.ARCHIVE).write_bytes(fake_cifar["archive"])
    data = load_dataset(cfg("cifar10_patches", patches_per_image=3), tmp_path)
    assert data.image_shape == (3, 8, 8) and data.kind == "8bit" and data.num_dims == 192
    assert (len(data.train), len(data.valid), len(data.test)) == (60, 30, 18) and data.test.dtype == torch.uint8
    assert "reading" in data.note
    test_images = fake_cifar["test"].reshape(-1, 3, 32, 32)
    for i, patch in enumerate(data.test.reshape(-1, 3, 8, 8).numpy()):
        image = test_images[i // 3]  # the crops of image i are rows 3i .. 3i+2
        windows = np.lib.stride_tricks.sliding_window_view(image, (3, 8, 8))[0]  # (25, 25, 3, 8, 8)
        assert (windows == patch).all(axis=(-3, -2, -1)).any()
    again = load_dataset(cfg("cifar10_patches", patches_per_image=3), tmp_path)
    assert torch.equal(again.train, data.train) and torch.equal(again.test, data.test)
    other = load_dataset(cfg("cifar10_patches", patches_per_image=3, split_seed=1), tmp_path)
    assert not torch.equal(other.test, data.test)


def test_random_patches_cover_all_positions():
    images = np.arange(2 * 3 * 10 * 10, dtype=np.int64).reshape(2, 3, 10, 10)
    gen = torch.Generator().manual_seed(0)
    patches = cifar_mod.random_patches(images, 4, 500, gen)
    corners = {(int(p[0, 0, 0]) % 100 // 10, int(p[0, 0, 0]) % 10) for p in patches}
    assert corners == {(r, c) for r in range(7) for c in range(7)}
    assert (np.diff(patches, axis=-1) == 1).all() and (np.diff(patches, axis=-2) == 10).all()


def test_fake_cifar10_is_generated_8bit_and_seeded(tmp_path):
    a = load_dataset(cfg("fake_cifar10"), tmp_path)
    b = load_dataset(cfg("fake_cifar10"), tmp_path)
    assert a.kind == "8bit" and a.image_shape == (3, 32, 32) and a.source == "generated" and not a.dynamic
    assert a.train.dtype == torch.uint8 and a.train.shape == (12, 3072) and len(a.valid) == len(a.test) == 12
    assert torch.equal(a.train, b.train) and not torch.equal(a.train, a.test)
    assert 30 < float(a.train.double().std()) < 120  # varied values, not a constant image
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"name": "cifar10", "binarize": "dynamic"}, "choose one of: none"),
        ({"name": "mnist", "binarize": "none"}, "choose one of: dynamic, static"),
        ({"name": "cifar10", "binarize": "none", "patch_size": 8}, "apply to dataset=cifar10_patches only"),
        ({"name": "cifar10_patches", "binarize": "none", "patch_size": 0}, "dataset.patch_size=0"),
        ({"name": "cifar10_patches", "binarize": "none", "patch_size": 40}, "dataset.patch_size=40"),
        ({"name": "cifar10", "binarize": "none", "fake_size": 3}, "fake_size=3"),
        ({"name": "fake_cifar10", "binarize": "none"}, "dataset.fake_size=0"),
    ],
    ids=["cifar-binarize", "mnist-none", "patch-elsewhere", "patch-zero", "patch-big", "fake-size", "fake-zero"],
)
def test_bad_values_give_one_line_errors(tmp_path, kwargs, fragment):
    assert fragment in one_line_error(DatasetConfig, **kwargs)  # the schema refuses them, before any file access
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", COLOR_DATASETS)
def test_color_dataset_yamls_compose(name):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), **hydra_version_base()):
        composed = compose(config_name=None, overrides=[f"+dataset={name}"]).dataset
    assert composed.name == name and composed.binarize == "none"
    assert set(composed) == set(DatasetConfig.__dataclass_fields__)
    assert composed.patch_size == (8 if name == "cifar10_patches" else 0)


@pytest.mark.parametrize("experiment", ["paper_cifar10", "paper_cifar10_patches"])
def test_experiment_configs_sweep_the_table3_lengths(experiment):
    from hydra import compose, initialize_config_dir

    import nfvi.vae.task  # noqa: F401  (registers base_train)

    with initialize_config_dir(config_dir=str(CONF_DIR), **hydra_version_base()):
        c = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert c.hydra.sweeper.params["flow.length"] == "0,2,5,10" and c.flow.kind == "planar"
    assert c.dataset.name == {"paper_cifar10": "cifar10", "paper_cifar10_patches": "cifar10_patches"}[experiment]
    assert c.model.likelihood == {"paper_cifar10": "discretized_logistic"}.get(experiment, "logit_normal")
    assert c.eval.num_samples == 200


@pytest.mark.data
def test_real_cifar10_when_present():
    root = Path(os.environ.get("NFVI_DATA", REPO.parent / "shared" / "data"))
    if not (root / cifar_mod.FOLDER).is_dir():
        pytest.skip(f"no {cifar_mod.FOLDER}/ in {root}")
    data = load_dataset(DatasetConfig(name="cifar10", binarize="none", valid_size=5000), root)
    assert (len(data.train), len(data.valid), len(data.test)) == (45000, 5000, 10000)
    assert data.train.dtype == torch.uint8 and data.train.shape[1] == 3072


# ---------------------------------------------------------------- Table 3


def table3_rows():
    import pandas as pd

    rows = []
    for dataset, likelihood, base in (("cifar10", "discretized_logistic", 6000.0), ("cifar10_patches", "logit_normal",
                                                                                  -250.0)):  # fmt: skip
        for k in (0, 2, 5, 10):
            for seed in (0, 1):
                nll = base - 3 * k + seed
                row = {"task": "vae", "dataset": dataset, "likelihood": likelihood, "model": "conv",
                       "latent_dim": 64, "flow": "planar", "flow_length": k, "seed": seed, "steps": 100,
                       "num_importance_samples": 20, "num_test_images": 50, "test_nll": nll,
                       "test_nll_se": 0.5, "test_neg_elbo": nll + 10, "test_kl": 10.0,
                       "finished_at": "2026-01-01T00:00:00", "run_dir": f"/runs/{dataset}/{k}/{seed}"}  # fmt: skip
                if dataset == "cifar10":
                    row["test_bpd"] = nll / (3072 * math.log(2))
                rows.append(row)
    rows.append({**rows[0], "dataset": "mnist", "likelihood": "bernoulli", "test_nll": 90.0})  # not Table 3
    return pd.DataFrame(rows)


def test_table3_is_written_beside_the_paper_values(tmp_path):
    from nfvi.reports.cifar import PAPER_TABLE3, is_table3_row, summarize_table3, write_table3

    frame = table3_rows()
    assert is_table3_row(frame).sum() == len(frame) - 1
    table = summarize_table3(frame)
    assert len(table) == 8 and set(table["dataset"]) == {"cifar10", "cifar10_patches"}
    assert (table["seeds"] == 2).all() and list(table["K"][:4]) == [0, 2, 5, 10]
    patches = table[table["dataset"] == "cifar10_patches"].set_index("K")
    assert patches.loc[5, "test_nll"] == pytest.approx(-250 - 15 + 0.5)
    assert patches.loc[10, "paper_nll"] == PAPER_TABLE3[10] == -320.7
    paths = write_table3(frame, tmp_path / "tables")
    assert [p.name for p in paths] == ["vae_table3.md", "vae_table3.csv"]
    md = table_cells(paths[0].read_text())
    assert "## dataset=cifar10 (" in md and "## dataset=cifar10_patches (" in md and "mnist" not in md
    assert "-293.7" in md and "-320.7" in md and "[U]" in md and "NOT comparable" in md
    images, patch_section = md.split("## dataset=cifar10_patches")
    assert "bits/dim" in images and "bits/dim" not in patch_section.split("\n\n", 2)[2]
    assert "| DLGM + NF (planar) | 10 | 5970.50 ± 0.71 | 2.804 |" in images
    assert write_table3(frame[frame["dataset"] == "mnist"], tmp_path / "none") == []


# ---------------------------------------------------------------- end to end: train, evaluate, report (generated data)

TINY_CIFAR = [
    "model.channels=4",
    "model.hidden=16",
    "model.latent_dim=4",
    "flow.length=2",
    "optim=adam",
    "optim.lr=1e-3",
    "trainer.steps=6",
    "trainer.batch_size=10",
    "trainer.log_every=3",
    "trainer.val_every=3",
    "trainer.ckpt_every=3",
    "trainer.progress=false",
    "eval.num_samples=4",
    "eval.elbo_samples=2",
    "eval.batch_size=64",
    "eval.progress=false",
    "device=cpu",
]


def test_cifar10_end_to_end_train_evaluate_report(tmp_path, fake_cifar):
    from nfvi.reports import vae as vae_report
    from nfvi.reports.task import collect
    from nfvi.vae.checkpoint import load_model
    from nfvi.vae.evaluate import evaluate_run
    from nfvi.vae.task import train
    from tests.conftest import compose

    root = tmp_path / "data"
    root.mkdir()
    (root / cifar_mod.ARCHIVE).write_bytes(fake_cifar["archive"])
    runs = tmp_path / "runs"
    common = [*TINY_CIFAR, "dataset.valid_size=10", f"paths.data_dir={root}"]
    images = train(compose("train", ["experiment=paper_cifar10", *common]), runs / "images")
    assert images["dataset"] == "cifar10" and images["likelihood"] == "discretized_logistic"
    assert images["data_kind"] == "8bit" and images["num_dims"] == 3072 and images["units"]["test_bpd"] == "bits/dim"
    assert images["test_bpd"] == pytest.approx(images["test_nll"] / (3072 * math.log(2)))
    assert images["test_neg_elbo_bpd"] == pytest.approx(images["test_neg_elbo"] / (3072 * math.log(2)))
    assert 1.0 < images["test_bpd"] < 16.0 and images["num_test_images"] == PER_BATCH
    model = load_model(runs / "images")  # the conv model is rebuilt from its checkpoint (x_dim = image shape)
    assert model.x_shape == (3, 32, 32)
    again = evaluate_run(runs / "images", compose("train", common).eval, root)
    assert again["test_nll"] == pytest.approx(images["test_nll"], rel=1e-9)

    patches = train(compose("train", ["experiment=paper_cifar10_patches", *common, "model.hidden=16"]),
                    runs / "patches")  # fmt: skip
    assert patches["dataset"] == "cifar10_patches" and patches["num_dims"] == 192
    assert patches["likelihood"] == "logit_normal" and patches["test_bpd"] is None  # a density: no bits/dim

    frame = collect([runs])
    paths = vae_report.write(frame[frame["task"] == "vae"].reset_index(drop=True), tmp_path / "tables")
    names = {p.name for p in paths}
    assert {"vae_table3.md", "vae_table3.csv"} <= names and "vae_table2.md" not in names  # CIFAR rows: Table 3 only
    md = table_cells((tmp_path / "tables" / "vae_table3.md").read_text())
    assert "## dataset=cifar10 (" in md and "## dataset=cifar10_patches (" in md and "-308.6" in md


def test_bernoulli_on_8bit_data_is_refused_in_one_line(tmp_path):
    from nfvi.vae.task import train
    from tests.conftest import compose

    cfg = compose("train", ["dataset=fake_cifar10", "dataset.fake_size=20", "model=conv", *TINY_CIFAR])
    message = one_line_error(train, cfg, tmp_path / "run")
    assert "model.likelihood=bernoulli" in message and "dataset=fake_cifar10" in message
