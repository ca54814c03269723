"""``pip install`` of the built wheel (not the checkout) runs every command: the configs ship inside the package.

The wheel goes into a fresh venv that reuses this interpreter's installed dependencies through a ``.pth`` file (no
download, works offline), never this checkout's nfvi: each command runs from a folder outside the checkout, without
``PYTHONPATH``, and ``nfvi.__file__`` must lie inside the venv.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import CONF_ROOT, REPO

pytestmark = pytest.mark.slow


def run(args: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", NFVI_DATA=str(cwd / "no-data"))
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, venv's bin/, a work folder outside the checkout) with the wheel installed in the venv (--no-deps)."""
    tmp = tmp_path_factory.mktemp("packaging")
    # Build from a copy of the sources: setuptools' build/ folder would otherwise keep files deleted from the checkout.
    src = tmp / "src"
    for name in ("nfvi", "hydra_plugins"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    build = run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-w", tmp / "dist"],
                cwd=tmp)  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("nfvi-*.whl")
    venv = tmp / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    assert made.returncode == 0, made.stderr
    py = venv / "bin" / "python"
    purelib = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip())
    # The heavy dependencies (torch, hydra, ...) come from this interpreter's site-packages. A plain path line is
    # not a site dir, so its .pth files (the editable nfvi finder among them) are not run: the checkout stays out.
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    (purelib / "_nfvi_test_deps.pth").write_text("\n".join(sorted(p for p in deps if Path(p).is_dir())) + "\n")
    pip = run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", wheel], cwd=tmp)
    if pip.returncode != 0:  # pip < 22.3 has no --python: install by unpacking the wheel with the venv's own pip
        pip = run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", purelib, wheel],
                  cwd=tmp)  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    work = tmp / "work"
    work.mkdir()
    return wheel, venv / "bin", work


def test_wheel_holds_every_config_yaml(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"nfvi/conf/{p.relative_to(CONF_ROOT).as_posix()}" for p in CONF_ROOT.rglob("*.yaml")}
    assert expected and expected <= names, sorted(expected - names)
    assert "nfvi/conf/train/train.yaml" in names and "nfvi/conf/shared/flow/planar.yaml" in names
    assert "hydra_plugins/nfvi_searchpath/nfvi_searchpath.py" in names
    # hydra-core 1.4 finds plugins by entry point (1.3 by scanning hydra_plugins): the search path is declared as one
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    declared = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[hydra.plugins]" in declared and "nfvi_searchpath.nfvi_searchpath:NfviSharedConfigs" in declared


def test_installed_package_is_the_wheel_not_the_checkout(installed):
    _, bin_dir, work = installed
    proc = run([bin_dir / "python", "-c", "import nfvi; print(nfvi.__file__)"], cwd=work)
    assert proc.returncode == 0, proc.stderr
    where = Path(proc.stdout.strip()).resolve()
    assert bin_dir.parent.resolve() in where.parents and REPO not in where.parents, where
    helped = run([bin_dir / "nfvi", "--help"], cwd=work)
    assert helped.returncode == 0 and "energy" in helped.stdout and "cde" in helped.stdout, helped.stderr
    groups = run([bin_dir / "nfvi", "train", "--help"], cwd=work)
    assert groups.returncode == 0 and "flow: householder, iaf, nice, none, planar, radial, sylvester" in (
        groups.stdout
    ), groups.stderr
    assert "experiment: " in groups.stdout and "mnist_smoke" in groups.stdout


def test_installed_energy_and_train_run_outside_the_checkout(installed):
    _, bin_dir, work = installed
    energy = run([bin_dir / "nfvi", "energy", "trainer.steps=20", "eval.samples=1000", "eval.grid=40",
                  "hydra.run.dir=runs/energy"], cwd=work)  # fmt: skip
    assert energy.returncode == 0, energy.stderr[-3000:]
    assert json.loads((work / "runs" / "energy" / "results.json").read_text())["task"] == "energy"
    train = run([bin_dir / "nfvi", "train", "experiment=mnist_smoke", "dataset=fake", "dataset.fake_size=200",
                 "model.hidden=16", "model.latent_dim=4", "flow.length=2", "trainer.steps=10", "trainer.batch_size=20",
                 "trainer.val_every=5", "trainer.val_images=50", "trainer.ckpt_every=5", "trainer.log_every=5",
                 "eval.num_samples=4", "eval.elbo_samples=2", "eval.max_images=40"], cwd=work)  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    (results,) = (work / "outputs" / "train").glob("*/results.json")
    assert json.loads(results.read_text())["dataset"] == "fake"
    assert not list((REPO / "outputs").glob("**/no-data"))  # nothing went to the checkout
