"""Shell conventions (nfvi.shell): ``nfvi --version``, tab completion through bash, ``--help`` without schemas."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import nfvi


def nfvi_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nfvi", *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )


def test_version():
    for flag in ("--version", "-V"):
        proc = nfvi_cli(flag)
        assert proc.returncode == 0 and proc.stdout.startswith(f"nfvi {nfvi.__version__} (torch "), proc.stdout


@pytest.mark.parametrize(
    "command", ["train", pytest.param("energy", marks=pytest.mark.slow), pytest.param("cde", marks=pytest.mark.slow)]
)
def test_help_lists_only_options_a_user_may_pick(command):
    proc = nfvi_cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    groups = proc.stdout.split("== Config ==")[0]
    assert "flow: " in groups and "planar" in groups
    assert "base_" not in groups
    assert proc.stdout.startswith(f"nfvi {command} is powered by Hydra.")


def test_unknown_shell_is_refused_in_one_line():
    proc = nfvi_cli("-sc", "install=zsh")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "nfvi: error: shell completion for 'zsh' is not available; choose: bash"
    ]


COMPLETE = r"""
eval "$(nfvi -sc install=bash)"
complete_line() {
    COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}; read -ra COMP_WORDS <<< "$COMP_LINE"
    [[ "$COMP_LINE" == *" " ]] && COMP_WORDS+=("")
    COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _nfvi_completion; echo "${COMPREPLY[*]}"
}
"""


LINES = {  # what a user typed before <TAB> -> what bash offers
    "nfvi tr": "train",
    "nfvi train flow=p": "flow=planar",
    "nfvi train flow=planar flow.le": "flow.length=",
    "nfvi energy tar": "target=",
    "nfvi cde dataset=conc": "dataset=concrete",
}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_completes_commands_groups_and_keys(tmp_path):
    """The installed script, run by bash as a shell would on <TAB>, completes through each command's config."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "nfvi"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m nfvi "$@"\n')
    launcher.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    script = COMPLETE + "".join(f'complete_line "{line}"\n' for line in LINES)
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.stdout.splitlines() == list(LINES.values()), proc.stderr
