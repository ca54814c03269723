"""``hydra/launcher=slurm``: Hydra's submitit SLURM launcher, with failures recorded as failures and restarts resumed.

:class:`SlurmLauncher` (the ``_target_`` of ``nfvi/conf/shared/hydra/launcher/slurm.yaml``, through its subclass
in ``hydra_plugins/nfvi_slurm``, where Hydra wants its plugins) is
``hydra_submitit_launcher``'s launcher with three changes, each on one side of the sweep:

* In the job (:meth:`SlurmLauncher.__call__`, run by ``python -m submitit.core._submit`` on the node):
  a job that failed (its ``error.txt``, written by :mod:`nfvi.cli`, or a task exception Hydra caught) still
  hands its result to the driver, then **exits 1**, so that SLURM records it ``FAILED`` with ``ExitCode 1:0``
  (``scontrol show job``, ``sacct``, the jobcomp record, e-mails). Plain submitit exits 0 there: Hydra catches
  the task's exception (Hydra issue #1928).
* Also in the job: a job that runs again after ``scontrol requeue`` (preemption, or submitit's own requeue at the
  time limit; ``SLURM_RESTART_COUNT`` > 0) gets ``resume=true overwrite=false``, so ``nfvi train`` continues its
  last checkpoint (bit-identical to an uninterrupted run) and the other commands redo an unfinished run.
* In the driver (:meth:`SlurmLauncher.launch`): ``signal_delay_s`` must fit in ``timeout_min`` (one-line error
  otherwise), and the jobs are awaited through ``squeue`` (no accounting database needed): a job that ends
  without a result (killed by ``scancel``, the time limit, the OOM killer, ``os._exit``) gets an ``error.txt``
  naming its SLURM state and logs in its folder after at most :data:`RESULT_GRACE_S` more seconds, so the sweep
  ends and exits 1 (:class:`nfvi.hydra_callbacks.SweepFailures`) instead of waiting forever.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import OmegaConf, open_dict

from nfvi.errors import NfviError

__all__ = ["SlurmLauncher", "check_timing", "job_states", "restart_overrides", "FINISHED_STATES"]

log = logging.getLogger(__name__)

#: SLURM job states after which a job runs no more (a requeued job passes through REQUEUED/PENDING instead)
FINISHED_STATES = frozenset(
    {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "ENDED"}
)
#: seconds a finished job's result may take to appear (shared file systems) before the job counts as killed
RESULT_GRACE_S = 15.0
#: seconds without an answer from ``squeue`` after which the driver gives up
SQUEUE_PATIENCE_S = 600.0


def check_timing(timeout_min: int, signal_delay_s: int) -> None:
    """One-line :class:`NfviError` unless the time-limit signal (``USR2``, ``signal_delay_s`` before the limit) comes
    in the last fifth of the job's ``timeout_min`` minutes.

    Such a signal leaves the job most of its time, and submitit counts it as a time-out (``max_num_timeout``
    requeues at most): a signal before ``min(0.8 T, T - 10 min)`` it takes for a preemption, requeued without limit.
    SLURM may send it up to a minute early anyway.
    """
    if signal_delay_s <= 0 or signal_delay_s * 5 > timeout_min * 60:
        raise NfviError(
            f"hydra.launcher.signal_delay_s={signal_delay_s} is not allowed with hydra.launcher.timeout_min="
            f"{timeout_min}; use 1 to {timeout_min * 12} (at most a fifth of the time limit, so that the time-limit "
            f"signal does not come at once)"
        )


def restart_overrides(overrides: Sequence[str], config) -> list[str]:
    """``overrides`` of a job that runs again (``SLURM_RESTART_COUNT`` > 0): ``resume=true overwrite=false`` for the
    commands that have these keys, so that the job continues its own run instead of refusing or clearing it."""
    forced = {key: value for key, value in (("resume", "true"), ("overwrite", "false")) if key in config}
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in forced]
    return [*kept, *(f"{key}={value}" for key, value in forced.items())]


def job_states(job_ids: Sequence[str]) -> dict[str, str] | None:
    """SLURM state of each job (``"<array id>_<index>"`` or plain ids) from one ``squeue`` call; jobs squeue no
    longer lists (over for ``MinJobAge``, default 5 minutes) are ``"ENDED"``. None when squeue cannot answer."""
    arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
    command = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T", f"--jobs={','.join(arrays)}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("squeue failed: %s", exc)
        return None
    if done.returncode != 0:
        if "Invalid job id" in done.stderr:  # none of them is known any more
            return dict.fromkeys(job_ids, "ENDED")
        log.warning("squeue failed (exit %d): %s", done.returncode, done.stderr.strip())
        return None
    listed = dict(line.split("|", 1) for line in done.stdout.split() if "|" in line)
    return {job_id: listed.get(job_id, "ENDED") for job_id in job_ids}


class SlurmLauncher(SubmititSlurmLauncher):
    """``hydra_submitit_launcher``'s SLURM launcher with nfvi's job ends and driver (see the module docstring)."""

    # -- in the job ----------------------------------------------------------------------------------------------------
    def __call__(
        self,
        sweep_overrides: list[str],
        job_dir_key: str,
        job_num: int,
        job_id: str,
        singleton_state: dict[type, Singleton],
    ) -> JobReturn:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if restarts > 0:
            sweep_overrides = restart_overrides(sweep_overrides, self.config)
            log.info("SLURM restart %d of this job: running it with %s", restarts, " ".join(sweep_overrides))
        ret = super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        if _job_failed(ret):
            _hand_over_and_exit(ret)
        return ret

    # -- in the driver -------------------------------------------------------------------------------------------------
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Submit the jobs as one array (as Hydra's launcher does), then wait for all of them (:meth:`_wait`)."""
        import submitit

        assert self.config is not None and len(job_overrides) > 0
        params = dict(self.params)
        check_timing(int(params["timeout_min"]), int(params["signal_delay_s"]))
        executor = submitit.AutoExecutor(
            cluster="slurm", folder=params.pop("submitit_folder"), slurm_max_num_timeout=params.pop("max_num_timeout")
        )
        generic = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in generic else f"slurm_{k}": v for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        job_params = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_params, strict=True))
        for idx, job in enumerate(jobs, start=initial_job_idx):
            log.info("\t#%d : SLURM job %s, logs in %s", idx, job.job_id, job.paths.folder)
        states = self._wait(jobs)
        return [self._result(job, p, states.get(job.job_id, "ENDED")) for job, p in zip(jobs, job_params, strict=True)]

    def _wait(self, jobs) -> dict[str, str]:
        """Until every job has its result or has ended without one :data:`RESULT_GRACE_S` ago. Polls ``squeue``
        every 2 s at first, then less often (every 30 s after 5 minutes). Returns the last SLURM state seen of the
        jobs that ended without a result."""
        ended_at: dict[str, float] = {}
        seen: dict[str, str] = {}
        started = last_answer = last_poll = time.monotonic()
        while True:
            now = time.monotonic()
            waiting = [job for job in jobs if not job.paths.result_pickle.exists()]
            if all(now - ended_at.get(job.job_id, math.inf) >= RESULT_GRACE_S for job in waiting):
                return seen  # each has its result, or ended more than RESULT_GRACE_S ago without one
            if waiting and now - last_poll >= min(30.0, 2.0 + (now - started) / 10):
                last_poll = now
                states = job_states([job.job_id for job in waiting])
                if states is None:
                    if now - last_answer > SQUEUE_PATIENCE_S:
                        raise NfviError(f"squeue gave no answer for {SQUEUE_PATIENCE_S:.0f} s; is SLURM up?")
                else:
                    last_answer = now
                    seen.update(states)
                    for job in waiting:
                        if states[job.job_id] in FINISHED_STATES:
                            ended_at.setdefault(job.job_id, now)
                        else:
                            ended_at.pop(job.job_id, None)  # requeued
            time.sleep(1.0)

    def _result(self, job, params, state: str) -> JobReturn:
        """The job's JobReturn; for a job that ended without one (or whose submitit wrapper failed), write its
        ``error.txt`` and return an empty one: :class:`nfvi.hydra_callbacks.SweepFailures` reports it."""
        from submitit.core.utils import FailedJobError, UncompletedJobError

        from nfvi.hydra_callbacks import record_failure
        from nfvi.runs import ERROR_FILE, atomic_write_text

        command = str(self.config.hydra.job.name)
        if job.paths.result_pickle.exists():
            try:
                return job.results()[0]
            except (FailedJobError, UncompletedJobError) as exc:  # e.g. requeued max_num_timeout times already
                first = next((line for line in str(exc).splitlines() if line.strip()), "")
                line = f"nfvi {command}: error: SLURM job {job.job_id} failed in submitit: {first}"
                details = f"{exc}\n"
        else:
            how = "no longer listed by squeue" if state == "ENDED" else state
            line = (
                f"nfvi {command}: error: SLURM job {job.job_id} ended without a result ({how}: killed by scancel, the "
                f"time limit or the memory limit, or crashed); its output: {job.paths.stdout} and {job.paths.stderr}"
            )
            tail = _tail(job.paths.stderr)
            details = f"last lines of {job.paths.stderr}:\n{tail}\n" if tail else ""
        overrides, job_dir_key, job_num = params[0], params[1], params[2]
        folder = self._job_folder(overrides, job_dir_key, job_num, job.job_id)
        atomic_write_text(folder / ERROR_FILE, f"{line}\n{details}")
        prefix = f"nfvi {command}: error: "
        record_failure(folder, line.removeprefix(prefix), sweep_dir=self.config.hydra.sweep.dir, num=job_num,
                       command=command)  # fmt: skip
        ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=None)
        ret.working_dir = str(folder)
        return ret

    def _job_folder(self, overrides: list[str], job_dir_key: str, job_num: int, job_id: str) -> Path:
        """The folder the job runs in, resolved as Hydra's ``run_job`` does in the job."""
        from hydra.core.hydra_config import HydraConfig

        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.id = job_id
            cfg.hydra.job.num = job_num
        saved = HydraConfig.instance().cfg
        try:
            HydraConfig.instance().set_config(cfg)
            folder = Path(str(OmegaConf.select(cfg, job_dir_key))) / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
        finally:
            HydraConfig.instance().cfg = saved
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def _job_failed(ret: JobReturn) -> bool:
    """Whether the job failed: an exception Hydra caught, or the ``error.txt`` nfvi's task wrapper wrote."""
    from nfvi.runs import ERROR_FILE

    if ret.status == JobStatus.FAILED:
        return True
    output_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg is not None else None
    return output_dir is not None and (Path(str(output_dir)) / ERROR_FILE).is_file()


def _hand_over_and_exit(ret: JobReturn) -> None:
    """Save ``ret`` where submitit's driver reads it (as submitit does after a job), then end the job process with
    status 1: ``SystemExit`` passes through submitit's ``except Exception``, which would overwrite the result."""
    import submitit
    from submitit.core import utils

    from nfvi.runs import ERROR_FILE

    paths = submitit.JobEnvironment().paths
    with utils.temporary_save_path(paths.result_pickle) as tmp:
        utils.cloudpickle_dump(("success", ret), tmp)
    folder = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg is not None else None
    log.error("the job failed (see %s); exiting with status 1", Path(str(folder)) / ERROR_FILE if folder else "above")
    raise SystemExit(1)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
