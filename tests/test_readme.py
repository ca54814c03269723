"""The README's examples cannot go stale: its runnable shell block and its Python blocks run here as written."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
FENCE = re.compile(r"(<!-- runnable -->\n)?```(\w+)\n(.*?)```", re.S)


def blocks(language: str, runnable_only: bool = False) -> list[str]:
    return [body for marker, lang, body in FENCE.findall(README) if lang == language and (marker or not runnable_only)]


def commands(block: str) -> list[str]:
    """The block's command lines, trailing ``# comments`` removed."""
    lines = [line.split(" #", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_is_short_and_its_links_resolve():
    assert len(README.splitlines()) < 200
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README)
    assert targets
    missing = [t for t in targets if not (REPO / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


@pytest.mark.slow
def test_readme_runnable_shell_block_runs_as_written(tmp_path):
    runnable = blocks("bash", runnable_only=True)
    assert len(runnable) == 1, "README has one runnable quickstart block"
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NFVI_DATA", None)  # the quickstart needs no data
    for command in commands(runnable[0]):
        argv = shlex.split(command)
        assert argv[0] == "nfvi", command
        done = subprocess.run(
            [sys.executable, "-m", "nfvi", *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert (tmp_path / "outputs" / "u2" / "results.json").is_file()
    assert (tmp_path / "outputs" / "vae" / "results.json").is_file()
    assert any((tmp_path / "outputs" / "vae" / "evaluations").glob("*.json"))
    assert (tmp_path / "outputs" / "tables" / "vae_table2.md").is_file()
    assert (tmp_path / "outputs" / "tables" / "energy.md").is_file()


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_block_runs(index):
    exec(compile(blocks("python")[index], f"README.md python block {index}", "exec"), {})
