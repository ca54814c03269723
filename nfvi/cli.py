"""``nfvi <command> [key=value ...]``: dispatch a subcommand to its Hydra task.

After the subcommand, Hydra owns the arguments (overrides, ``-m`` for multirun, ``--help``,
``--cfg job``, ``--info searchpath``). Each command has its own config root ``nfvi/conf/<command>/`` (package
data, so a wheel carries it) holding ``<command>.yaml`` and the command's own groups; the groups every command
uses are in ``nfvi/conf/shared/``, on each root's search path.
User errors (bad config values, missing data, ...) end in one line on stderr and exit status 2; any other failure
in one line naming the exception and ``<run folder>/error.txt`` (the line, then the traceback), exit status 1.
Each job runs exactly once; a sweep goes on past a failed job and exits 1 at the end
(:class:`nfvi.hydra_callbacks.SweepFailures`). A job's folder is claimed before anything is written into it; a
refused launch changes nothing there (:func:`_job`). Ctrl-C ends every command in one line, exit status 130.
A job returns its command's headline number (:data:`HEADLINES`) to Hydra, so that optimising sweepers
(``hydra/sweeper=optuna``) can minimise it; a failed job returns None.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import warnings
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


def _override_under_null(exc: BaseException, overrides: list[str]) -> str | None:
    """The one-line error for an override that sets a key inside a null (unselected) config node, which OmegaConf
    rejects with a bare ``AssertionError``: ``logger.wandb.mode=online`` without ``logger=[...,wandb]``. None: not
    that error."""
    if not (isinstance(exc, AssertionError) and "Unexpected type for root: NoneType" in str(exc)):
        return None
    from nfvi.trackers import TRACKERS

    selected = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == "logger"), "")
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "logger" and parts[1] in TRACKERS and parts[1] not in selected:
            return (
                f"{override}: the {parts[1]} tracker is not selected, so logger.{parts[1]} has no keys; select it "
                f"with logger=[csv,{parts[1]}] (trackers: {', '.join(TRACKERS)})"
            )
    shown = " ".join(o for o in overrides if "." in o.split("=", 1)[0])
    return f"an override sets a key inside a config group that is not selected (null) among: {shown}"


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


#: commands whose job folder (Hydra's output directory) is their run folder: claimed before the task writes there
CLAIMING = ("train", "energy", "cde")
#: Hydra's record of a launch in its job folder, written by nfvi once the launch is admitted (:func:`_save_launch`)
HYDRA_SUBDIR = ".hydra"
#: the process that launched the command (a sweep's jobs under joblib or submitit run in other processes)
_LAUNCHER_PID: int | None = None


def _own_files(folder: Path) -> list[str]:
    """What a job folder holds besides Hydra's files (``.hydra/``, the job log), :data:`ERROR_FILE` and the run's
    bookkeeping (:mod:`nfvi.runs`: its lock and its config record)."""
    from hydra.core.hydra_config import HydraConfig

    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in _bookkeeping(HydraConfig.get().job.name))


def _bookkeeping(job_name: str) -> set[str]:
    from nfvi.runs import ERROR_FILE, LOCK, RUN_RECORD

    return {HYDRA_SUBDIR, f"{job_name}.log", ERROR_FILE, LOCK, RUN_RECORD, "run_config.json"}


def _save_launch(folder: Path, cfg) -> None:
    """Hydra's record of this launch (``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``, as Hydra writes
    them), and no ``error.txt`` of an earlier attempt: called once the run is admitted (:func:`nfvi.runs.on_admission`).
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from nfvi.runs import ERROR_FILE, atomic_write_text

    hydra_cfg = HydraConfig.instance().cfg
    record = folder / HYDRA_SUBDIR
    overrides = hydra_cfg.hydra.overrides.task
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg), ("overrides.yaml", overrides)):
        atomic_write_text(record / name, OmegaConf.to_yaml(node))
    (folder / ERROR_FILE).unlink(missing_ok=True)


def _remove_bookkeeping(folder: Path) -> None:
    """Remove what this launch wrote into a folder it created (``.hydra/``, its log, its config record); the lock is
    released afterwards and :func:`_remove_created` removes the folder if it is then empty."""
    import shutil

    from hydra.core.hydra_config import HydraConfig

    from nfvi.runs import LOCK

    for name in _bookkeeping(HydraConfig.get().job.name) - {LOCK}:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _remove_created() -> None:
    """Remove the folders this launch created (:class:`nfvi.hydra_callbacks.RunFolder`), deepest first, each only
    if it is empty (another process may have started to use it)."""
    from nfvi.hydra_callbacks import RunFolder

    for folder in reversed(RunFolder.created):
        try:
            folder.rmdir()
        except OSError:
            break
    RunFolder.created = []


def _job_failed(command: str, exc: Exception, folder: Path, *, user: bool, write: bool) -> tuple[int, str]:
    """Report a failed job in one line on stderr and, when ``write`` (the job held its folder and was not refused),
    in ``<folder>/error.txt`` with the traceback. Otherwise the traceback of an unexpected error goes to stderr.

    Returns ``(exit status, the error without its prefix)``: 2 user error, 1 anything else (or the error's own
    ``exit_status``: 1 for a diverged run, :class:`nfvi.errors.DivergenceError`, reported in one line like a user
    error).
    """
    import traceback

    from nfvi.runs import ERROR_FILE, atomic_write_text

    error_file = folder / ERROR_FILE
    if user:
        error = one_line(exc)
    else:
        first = next(iter(str(exc).splitlines()), "")
        error = f"{type(exc).__name__}{': ' if first else ''}{first}"
    line = f"nfvi {command}: error: {error}"
    if write:
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
    return (getattr(exc, "exit_status", 2) if user else 1), error


def _job(command: str, task, debug: bool):
    """Wrap ``task`` so that it runs exactly once, in a folder it holds, and every failure ends in one line.

    The job's folder (:data:`CLAIMING` commands) is claimed first (:func:`nfvi.runs.claim_folder`: its lock, another
    command's run refused): a refused launch writes nothing there (Hydra writes only the folder itself: its log
    opens at its first line, and ``.hydra/`` is written here once the run is admitted). A failure of a job that
    held its folder leaves ``error.txt``; a user error in a folder this launch created, before it wrote anything of
    its own, removes the folder again.

    Single run: sets :data:`_run_status` (2 user error, 1 other). Sweep: the job returns normally so the others go
    on; it records its failure for :class:`nfvi.hydra_callbacks.SweepFailures` (found wherever the job folders lie),
    and a job in a process of its own ends with the launcher. ``debug`` (``HYDRA_FULL_ERROR=1``): re-raise after
    reporting.
    """
    user_errors = _user_error_types()

    @functools.wraps(task)
    def task_function(cfg):
        from omegaconf import OmegaConf

        from nfvi.config import validate
        from nfvi.errors import RunRefused
        from nfvi.hydra_callbacks import record_failure
        from nfvi.runs import claim_folder, on_admission, run_dir

        folder = run_dir()
        multirun = _is_multirun()
        if multirun and os.getpid() != _LAUNCHER_PID:
            _end_with_launcher()

        def failed(exc: Exception, held: bool) -> bool:
            global _run_status
            user = isinstance(exc, user_errors)
            refused = isinstance(exc, RunRefused) or not held
            diverged = getattr(exc, "exit_status", 2) != 2  # a failed run (nfvi.errors.DivergenceError): kept
            remove = held and user and not refused and not diverged and not multirun and not _own_files(folder)
            remove = remove and folder.resolve() in [p.resolve() for p in _created()]
            if remove:
                _remove_bookkeeping(folder)
            status, error = _job_failed(command, exc, folder, user=user, write=held and not refused and not remove)
            if multirun:
                record_failure(folder, error)
            else:
                _run_status = status
            return remove

        held = contextlib.ExitStack()
        claim = command in CLAIMING and _is_job_folder(folder)
        try:
            if claim:
                overwrite = bool(OmegaConf.select(cfg, "overwrite", default=False))
                held.enter_context(claim_folder(folder, command, overwrite=overwrite))
                held.enter_context(on_admission(folder, functools.partial(_save_launch, folder, cfg)))
        except Exception as exc:  # refused: this launch changed nothing in the folder
            held.close()
            failed(exc, held=False)
            if debug:
                raise
            return None
        remove = False
        _job_running(True)
        try:
            with held, _sigterm_ends_job():
                try:
                    validate(cfg)  # every config value, once, before the task writes anything
                    return headline(command, task(cfg))
                except Exception as exc:
                    remove = failed(exc, held=claim)
                    if debug:
                        raise
        finally:
            _job_running(False)
        if remove:
            _remove_created()
        return None

    return task_function


@contextlib.contextmanager
def _sigterm_ends_job():
    """SIGTERM raises ``SystemExit(143)`` during the job (where nothing else handles it), so that its claim of the
    folder is released (:func:`_end_with_launcher` ends a sweep's worker so)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _created() -> list[Path]:
    from nfvi.hydra_callbacks import RunFolder

    return list(RunFolder.created)


def _end_with_launcher() -> None:
    """In a sweep job running in a process of its own (joblib's loky workers, submitit's local jobs): end this process
    when its parent (the launcher) is gone, even after a SIGKILL of the launcher, by polling the parent's pid once a
    second (portable, unlike Linux's ``PR_SET_PDEATHSIG``). It sends itself SIGTERM (a run stops as after ``kill``:
    train saves its checkpoint, every Run releases its lock), then exits at the latest 30 s later."""
    import signal
    import threading
    import time

    global _watching
    if _watching:
        return
    _watching = True
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(300):  # the job winds down (a worker may catch its SystemExit and wait for more work)
            if not _in_job:
                break
            time.sleep(0.1)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="nfvi-end-with-launcher", daemon=True).start()


_watching = False
#: whether a job is running in this process (:func:`_end_with_launcher` waits for it to end)
_in_job = False


def _job_running(flag: bool) -> None:
    """Set :data:`_in_job`. A module-level function: a sweep's job function reaches a worker by value (cloudpickle,
    with copies of the globals it names), so it must change this module's state through a function of the module."""
    global _in_job
    _in_job = flag


def _is_job_folder(folder: Path) -> bool:
    """Whether ``folder`` is a job's own folder: not the launch directory (``nfvi report``'s) or a folder above it."""
    from hydra.core.hydra_config import HydraConfig

    cwd = Path(HydraConfig.get().runtime.cwd).resolve()  # where nfvi was started, also with hydra.job.chdir=true
    folder = folder.resolve()
    return folder != cwd and folder not in cwd.parents


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``nfvi``. Ctrl-C (SIGINT) ends any command in one line, exit status 130."""
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
    try:
        _main(command, rest)
    except KeyboardInterrupt:  # Ctrl-C: every run's lock was released on the way out (its context managers)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"nfvi {command}: interrupted (Ctrl-C); what was written so far is kept", file=sys.stderr)
        sys.exit(130)


def _main(command: str, rest: list[str]) -> None:
    global _run_status, _LAUNCHER_PID
    module_name, function_name, _ = COMMANDS[command]
    module = importlib.import_module(module_name)
    task = getattr(module, function_name)

    import hydra

    from nfvi.config import hydra_version_base
    from nfvi.hydra_callbacks import RunFolder, SweepFailures

    # hydra-core 1.4 instantiates hydra.callbacks without an execution whitelist and warns, once per callback, that
    # the target could be any code: nfvi's callbacks are its own (conf/shared/hydra_defaults.yaml), so it says nothing
    warnings.filterwarnings("ignore", r"hydra\.utils\.instantiate\(\) resolved _target_='nfvi\.hydra_callbacks\.")

    debug = os.environ.get("HYDRA_FULL_ERROR") == "1"
    _run_status = 0
    _LAUNCHER_PID = os.getpid()
    SweepFailures.failed = []
    RunFolder.created = []
    sys.argv = [f"nfvi-{command}", *rest]
    listing = {"--help", "-h", "-sc", "--shell-completion"} & set(rest)
    with _hydra_raises(), schemas_hidden() if listing else contextlib.nullcontext():
        try:
            main_fn = hydra.main(config_path=str(conf_dir(command)), config_name=command, **hydra_version_base())
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
            unselected = _override_under_null(exc, rest)
            if unselected is not None:
                print(f"nfvi {command}: error: {unselected}", file=sys.stderr)
                sys.exit(2)
            if isinstance(exc, ValueError) and "No trials are completed yet" in str(exc):  # Optuna's best_trial
                print(f"nfvi {command}: error: no trial of the sweep completed (each trial's error is above, and in "
                      f"error.txt in the folder of each that ran)", file=sys.stderr)  # fmt: skip
                sys.exit(1)
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
