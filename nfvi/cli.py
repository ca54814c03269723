"""``nfvi <command> [key=value ...]``: dispatch a subcommand to its Hydra task.

After the subcommand, Hydra owns the arguments (overrides, ``-m`` for multirun, ``--help``,
``--cfg job``, ``--info searchpath``). Each command has a primary config ``conf/<command>.yaml``.
User errors (bad config values, missing data, ...) end in one line on stderr and exit status 2.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from pathlib import Path

#: command -> (module, function, one-line description). The function takes the composed config.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "energy": ("nfvi.energy_fit", "run", "fit a flow to a 2-D energy U(z) (paper Sec. 6.1, Table 1, Fig. 3)"),
    "train": ("nfvi.vae.train", "run", "train a VAE with a flow posterior on images (paper Sec. 6.2, Table 2)"),
    "evaluate": ("nfvi.vae.evaluate", "run", "estimate -ln p(x) of a trained run by importance sampling"),
    "cde": ("nfvi.cde.run", "run", "conditional density estimation p(y|x) with flows on UCI data"),
    "report": ("nfvi.report", "run", "collect results.json under outputs/ into tables and figures"),
}

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: nfvi <command> [key=value ...] [-m] [--help]",
        "",
        "Variational inference with normalizing flows (Rezende & Mohamed, ICML 2015).",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, _, desc) in COMMANDS.items()]
    lines += ["", "`nfvi <command> --help` shows the command's config groups and options (Hydra's help)."]
    return "\n".join(lines)


def one_line(exc: BaseException) -> str:
    """Fold an exception (and its causes) into one line, dropping Hydra's hints and OmegaConf's key dumps."""
    parts: list[str] = []
    while exc is not None:
        for line in str(exc).splitlines():
            line = line.strip()
            if not line or line.startswith(("full_key:", "object_type=", "reference_type=", "To append", "Config search path")):
                continue
            if line.startswith(("provider=", "path=", "file://", "pkg://", "structured://")):
                continue
            if line not in parts:
                parts.append(line)
        exc = exc.__cause__
    return " ".join(p if p.endswith((".", ":")) else p + ";" for p in parts).rstrip(";")


def _user_error_types() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from nfvi.errors import NfviError

    return (NfviError, HydraException, OmegaConfBaseException)


def _install_error_reporter(command: str) -> None:
    """Make Hydra report user errors in one line (``HYDRA_FULL_ERROR=1`` restores tracebacks)."""
    import hydra._internal.utils as hydra_utils

    original = hydra_utils.run_and_report
    user_errors = _user_error_types()

    def run_and_report(func):
        try:
            return func()
        except user_errors as exc:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"nfvi {command}: error: {one_line(exc)}", file=sys.stderr)
            sys.exit(2)
        except Exception:
            return original(func)

    hydra_utils.run_and_report = run_and_report


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``nfvi``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"nfvi: error: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module_name, function_name, _ = COMMANDS[command]
    task = getattr(importlib.import_module(module_name), function_name)

    import hydra

    _install_error_reporter(command)

    @functools.wraps(task)
    def task_function(cfg):
        return task(cfg)

    sys.argv = [f"nfvi-{command}", *rest]
    hydra.main(config_path=str(CONF_DIR), config_name=command, version_base="1.3")(task_function)()


if __name__ == "__main__":
    main()
