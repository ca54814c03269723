"""``nfvi <command> [key=value ...]``: dispatch a subcommand to its Hydra task.

After the subcommand, Hydra owns the arguments (overrides, ``-m`` for multirun, ``--help``,
``--cfg job``, ``--info searchpath``). Each command has its own config root ``nfvi/conf/<command>/`` (package
data, so a wheel carries it) holding ``<command>.yaml`` and the command's own groups; the groups every command
uses are in ``nfvi/conf/shared/``, on each root's search path.
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

CONF_DIR = Path(__file__).resolve().parent / "conf"


def conf_dir(command: str) -> Path:
    """The config root of ``command``: ``nfvi/conf/<command>/`` with ``<command>.yaml`` and its own groups."""
    return CONF_DIR / command


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


SKIP_PREFIXES = (
    "full_key:",
    "object_type=",
    "reference_type=",
    "To append",
    "Config search path",
    "provider=",
    "path=",
)


def one_line(exc: BaseException) -> str:
    """Fold an exception (and its causes) into one line, dropping Hydra's hints and OmegaConf's key dumps.

    Hydra's "Available options in 'flow':" block becomes a comma-separated list without the ``base_*`` schemas.
    """
    parts: list[str] = []
    while exc is not None:
        options: list[str] | None = None
        for raw in str(exc).splitlines():
            line = raw.strip()
            if not line or line.startswith(SKIP_PREFIXES):
                continue
            if line.startswith("Available options in"):
                parts.append(line.rstrip(":"))
                options = []
            elif options is not None and raw.startswith(("\t", "  ")):
                if not line.startswith("base_"):
                    options.append(line)
            elif line not in parts:
                if options:
                    parts.append(": " + ", ".join(options))
                options = None
                parts.append(line)
        if options:
            parts.append(": " + ", ".join(options))
        exc = exc.__cause__
    text = ""
    for part in parts:
        if part.startswith(": ") or not text:
            text += part
        else:
            text += ("" if text.endswith((".", ":", ";")) else ";") + " " + part
    return text


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
    module = importlib.import_module(module_name)
    task = getattr(module, function_name)

    import hydra

    from nfvi.errors import NfviError

    _install_error_reporter(command)

    @functools.wraps(task)
    def task_function(cfg):
        try:
            return task(cfg)
        except NfviError as exc:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"nfvi {command}: error: {one_line(exc)}", file=sys.stderr)
            if not _is_multirun():
                sys.exit(2)
            # In a sweep, one failed job (a NaN, a bad combination) should not cancel the others: report it,
            # carry on, and exit non-zero once the sweep is done.
            _failed_jobs.append(str(exc))
            return {"error": str(exc)}

    sys.argv = [f"nfvi-{command}", *rest]
    hydra.main(config_path=str(conf_dir(command)), config_name=command, version_base="1.3")(task_function)()
    if _failed_jobs:
        print(f"nfvi {command}: error: {len(_failed_jobs)} job(s) of the sweep failed (see above)", file=sys.stderr)
        sys.exit(1)


_failed_jobs: list[str] = []


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


if __name__ == "__main__":
    main()
