"""``nfvi <command> [key=value ...]``: dispatch a subcommand to its Hydra task.

After the subcommand, Hydra owns the arguments (overrides, ``-m`` for multirun, ``--help``,
``--cfg job``, ``--info searchpath``). Each command has its own config root ``nfvi/conf/<command>/`` (package
data, so a wheel carries it) holding ``<command>.yaml`` and the command's own groups; the groups every command
uses are in ``nfvi/conf/shared/``, on each root's search path.
User errors (bad config values, missing data, ...) end in one line on stderr and exit status 2; any other failure
in one line naming the exception and ``<run folder>/error.txt`` (the line, then the traceback), exit status 1.
Each job runs exactly once; a sweep goes on past a failed job and exits 1 at the end
(:class:`nfvi.hydra_callbacks.SweepFailures`). A job returns its command's headline number (:data:`HEADLINES`) to
Hydra, so that optimising sweepers (``hydra/sweeper=optuna``) can minimise it; a failed job returns None.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
from pathlib import Path

from nfvi.shell import install_request, schemas_hidden

#: command -> (module, function, one-line description). The function takes the composed config.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "energy": ("nfvi.energy.task", "run", "fit a flow to a 2-D energy U(z) (paper Sec. 6.1, Table 1, Fig. 3)"),
    "train": ("nfvi.vae.task", "run", "train a VAE with a flow posterior on images (paper Sec. 6.2, Table 2)"),
    "evaluate": ("nfvi.vae.evaluate", "run", "estimate -ln p(x) of a trained run by importance sampling"),
    "cde": ("nfvi.cde.task", "run", "conditional density estimation p(y|x) with flows on UCI data"),
    "report": ("nfvi.reports.task", "run", "collect results.json under outputs/ into tables and figures"),
}

CONF_DIR = Path(__file__).resolve().parent / "conf"

#: command -> the key of its results that its Hydra task returns, as a float, for optimising sweepers
#: (``hydra/sweeper=optuna`` minimises it); results.json keeps every number
HEADLINES = {"train": "val_neg_elbo_best", "energy": "kl", "cde": "val_nll_standardized_mean"}


def headline(command: str, results):
    """What ``nfvi <command>``'s task returns to Hydra: ``results[HEADLINES[command]]`` as a float (NaN when the
    run has none, e.g. a non-finite value written as null); ``results`` as it is for the other commands."""
    if command not in HEADLINES or not isinstance(results, dict):
        return results
    value = results.get(HEADLINES[command])
    return float("nan") if value is None else float(value)


def conf_dir(command: str) -> Path:
    """The config root of ``command``: ``nfvi/conf/<command>/`` with ``<command>.yaml`` and its own groups."""
    return CONF_DIR / command


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: nfvi <command> [key=value ...] [-m] [--help]   |   nfvi --version   |   nfvi -sc install=bash",
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


#: Exit status of the last single run (0 ok, 1 unexpected error, 2 user error); sweeps use SweepFailures.
_run_status = 0


@contextlib.contextmanager
def _hydra_raises():
    """Make Hydra raise its own errors (composition, sweep validation, launchers) instead of printing them.

    Hydra's documented debugging switch ``HYDRA_FULL_ERROR=1`` re-raises them out of ``hydra.main``, so that
    :func:`main` can fold them into one line. The user's own setting is restored afterwards.
    """
    old = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = old


def _own_files(folder: Path) -> list[str]:
    """What a job folder holds besides Hydra's files (``.hydra/``, the job log), :data:`ERROR_FILE` and the run's
    bookkeeping (:mod:`nfvi.runs`: its lock and its config record)."""
    from hydra.core.hydra_config import HydraConfig

    from nfvi.runs import ERROR_FILE, LOCK, RUN_RECORD

    hydra_cfg = HydraConfig.get()
    subdir = Path(str(hydra_cfg.output_subdir)).parts[0]  # ".hydra" (also for evaluate's .hydra/evaluate-<time>)
    hydra_files = {subdir, f"{hydra_cfg.job.name}.log", ERROR_FILE, LOCK, RUN_RECORD, "run_config.json"}
    return sorted(p.name for p in folder.iterdir() if p.name not in hydra_files) if folder.is_dir() else []


def _remove_run_folder(folder: Path, output_dir: str | None) -> None:
    """Delete a job folder, then the folders above it that are left empty, up to (not including) ``output_dir``."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    if output_dir is None:
        return
    top = Path(output_dir).resolve()
    parent = folder.resolve().parent
    while top in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def _job_failed(command: str, exc: Exception, folder: Path, *, user: bool, remove: bool, output_dir=None) -> int:
    """Report a failed job in one line on stderr and in ``<folder>/error.txt`` (with the traceback).

    ``remove``: delete the folder (and the folders above it left empty, up to ``output_dir``) instead: a refused
    config or data file, the job wrote nothing of its own. A command that runs in the working directory
    (``nfvi report``) gets no ``error.txt`` there: the traceback of an unexpected error goes to stderr.
    Returns the exit status: 2 user error, 1 anything else (or the error's own ``exit_status``: 1 for a diverged
    run, :class:`nfvi.errors.DivergenceError`, reported in one line like a user error).
    """
    import traceback

    from nfvi.runs import ERROR_FILE, atomic_write_text

    status = getattr(exc, "exit_status", 2) if user else 1
    error_file = folder / ERROR_FILE
    if user:
        line = f"nfvi {command}: error: {one_line(exc)}"
    else:
        first = next(iter(str(exc).splitlines()), "")
        line = f"nfvi {command}: error: {type(exc).__name__}{': ' if first else ''}{first}"
    if remove:
        _remove_run_folder(folder, output_dir)
    elif _is_job_folder(folder):
        try:
            saved = f"{line} (traceback saved in {error_file})" if not user else line
            atomic_write_text(error_file, saved + "\n" + "".join(traceback.format_exception(exc)))
            line = saved
        except OSError as write_error:  # a full disk must not hide the job's own error
            traceback.print_exception(exc)
            line += f" (could not save {error_file}: {write_error}; traceback above)"
    elif not user:
        traceback.print_exception(exc)
        line += " (traceback above)"
    print(line, file=sys.stderr)
    return status


def _job(command: str, task, debug: bool):
    """Wrap ``task`` so that it runs exactly once and every failure ends in one line and ``error.txt``.

    Single run: sets :data:`_run_status` (2 user error, 1 other). Sweep: the job returns normally so the others go
    on; :class:`nfvi.hydra_callbacks.SweepFailures` reports it at the end. ``debug`` (``HYDRA_FULL_ERROR=1``):
    re-raise after reporting.
    """
    user_errors = _user_error_types()

    @functools.wraps(task)
    def task_function(cfg):
        global _run_status
        from omegaconf import OmegaConf

        from nfvi.config import validate
        from nfvi.runs import ERROR_FILE, run_dir

        folder = run_dir()
        fresh = not _own_files(folder)  # nothing but Hydra's files: this job made the folder
        if _is_job_folder(folder):
            (folder / ERROR_FILE).unlink(missing_ok=True)  # from an earlier attempt
        try:
            validate(cfg)  # every config value, once, before the task writes anything
            return headline(command, task(cfg))
        except Exception as exc:
            user = isinstance(exc, user_errors)
            multirun = _is_multirun()
            refused = user and getattr(exc, "exit_status", 2) == 2  # not a diverged run: that keeps its folder
            remove = refused and fresh and not multirun and not _own_files(folder) and _is_job_folder(folder)
            output_dir = OmegaConf.select(cfg, "paths.output_dir")
            status = _job_failed(command, exc, folder, user=user, remove=remove, output_dir=output_dir)
            if debug:
                raise
            if not multirun:
                _run_status = status
            return None

    return task_function


def _is_job_folder(folder: Path) -> bool:
    """Whether ``folder`` is a job's own folder: not the launch directory (``nfvi report``'s) or a folder above it."""
    from hydra.core.hydra_config import HydraConfig

    cwd = Path(HydraConfig.get().runtime.cwd).resolve()  # where nfvi was started, also with hydra.job.chdir=true
    folder = folder.resolve()
    return folder != cwd and folder not in cwd.parents


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``nfvi``."""
    global _run_status
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] in ("-V", "--version"):
        from nfvi.shell import version_line

        print(version_line())
        return
    shell = install_request(argv)
    if shell is not None:  # nfvi's own completion script (Hydra's would complete a program per command)
        from nfvi.shell import completion_script

        try:
            print(completion_script(shell, COMMANDS))
        except ValueError as exc:
            print(f"nfvi: error: {exc}", file=sys.stderr)
            sys.exit(2)
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"nfvi: error: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module_name, function_name, _ = COMMANDS[command]
    module = importlib.import_module(module_name)
    task = getattr(module, function_name)

    import hydra

    from nfvi.hydra_callbacks import SweepFailures

    debug = os.environ.get("HYDRA_FULL_ERROR") == "1"
    _run_status = 0
    SweepFailures.failed = []
    sys.argv = [f"nfvi-{command}", *rest]
    listing = {"--help", "-h", "-sc", "--shell-completion"} & set(rest)
    with _hydra_raises(), schemas_hidden() if listing else contextlib.nullcontext():
        try:
            main_fn = hydra.main(config_path=str(conf_dir(command)), config_name=command, version_base="1.3")
            main_fn(_job(command, task, debug))()
        except _user_error_types() as exc:  # Hydra's own: a bad override, an unknown option, a type error
            if debug:
                raise
            print(f"nfvi {command}: error: {one_line(exc)}", file=sys.stderr)
            sys.exit(2)
        except OSError as exc:  # the file system: a run folder Hydra cannot make or write (a file, /dev/null/x)
            from nfvi.runs import environment_fault

            fault = environment_fault(exc)
            if debug or fault is None:
                raise
            print(f"nfvi {command}: error: {fault}", file=sys.stderr)
            sys.exit(2)
        except Exception as exc:  # a launcher or Hydra itself failed (e.g. a submitit job killed for time or memory)
            if debug:
                raise
            from nfvi.runs import environment_fault

            fault = environment_fault(exc)  # e.g. Hydra's log file on a read-only file system (inside a ValueError)
            if fault is not None:
                print(f"nfvi {command}: error: {fault}", file=sys.stderr)
                sys.exit(2)
            import traceback

            traceback.print_exc()
            print(f"nfvi {command}: error: the command failed (traceback above)", file=sys.stderr)
            sys.exit(1)
    if _run_status:
        sys.exit(_run_status)
    if SweepFailures.failed:
        sys.exit(1)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


if __name__ == "__main__":
    main()
