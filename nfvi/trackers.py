"""Experiment trackers: ``logger=[tensorboard,wandb,mlflow]`` sends what ``metrics.csv`` holds to TensorBoard,
Weights & Biases or MLflow as well.

``metrics.csv`` (``logger=csv``) is always written; each tracker selected beside it receives

- every row of ``metrics.csv`` as it is written: its numeric fields as scalars at the row's ``step``
  (:meth:`Tracker.log_metrics`); an empty field (train's ``val_neg_elbo`` between validations) is left out;
- the run's resolved config, once, when the run starts training (:meth:`Tracker.log_config`);
- the final results (those of ``results.json``, its ``config`` aside), numeric ones as ``results/<key>``
  (:meth:`Tracker.log_results`);

and is closed when the run ends (marked failed when it ends in an error). A resumed run continues its trackers'
run rather than starting another: W&B's run id and an MLflow tag ``nfvi.run_id`` are the nfvi run's ``run_id``
(``run_config.json``), and TensorBoard hides the events logged after the checkpoint the run resumes from
(``purge_step``), as ``metrics.csv`` drops those rows (:meth:`Trackers.rewind`).

Where each writes, by default inside the run folder: TensorBoard ``<run>/tensorboard/`` (event files); W&B
``<run>/wandb/`` in offline mode unless ``logger.wandb.mode`` or ``WANDB_MODE`` says otherwise (``wandb sync``
uploads it later); MLflow a file store ``<run>/mlruns/`` unless ``logger.mlflow.tracking_uri`` or
``MLFLOW_TRACKING_URI`` names a server or database.

The packages are optional (``pip install 'nfvi[trackers]'``) and imported only when their tracker is selected.
This module imports no torch (the schemas are part of every command's config).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from nfvi.errors import NfviError, check_choice

__all__ = [
    "TRACKERS",
    "INSTALL_HINT",
    "CsvConfig",
    "TensorBoardConfig",
    "WandbConfig",
    "MlflowConfig",
    "LoggerConfig",
    "Tracker",
    "Trackers",
    "open_trackers",
    "flatten_config",
    "scalars",
]

#: the options of the ``logger`` group (``nfvi/conf/shared/logger/``)
TRACKERS = ("csv", "tensorboard", "wandb", "mlflow")
INSTALL_HINT = "pip install 'nfvi[trackers]'"
WANDB_MODES = ("offline", "online", "disabled")
#: the MLflow tag holding the nfvi run's ``run_id`` (how a resumed run finds its MLflow run)
RUN_ID_TAG = "nfvi.run_id"


# ---------------------------------------------------------------------------------------------------------------------
# Schemas: ``logger.<name>`` is null unless ``logger=[...]`` selects ``<name>`` (csv: always on)


@dataclass
class CsvConfig:
    """``metrics.csv`` in the run folder: always written, whatever ``logger=`` lists."""


@dataclass
class TensorBoardConfig:
    """``logger=[tensorboard]``: event files in ``<run folder>/<dir>`` (``tensorboard --logdir outputs``)."""

    dir: str = "tensorboard"  # relative to the run folder (or absolute)


@dataclass
class WandbConfig:
    """``logger=[wandb]``: a W&B run per nfvi run, its files in ``<run folder>/<dir>/wandb/``."""

    project: str = "nfvi"
    entity: Optional[str] = None
    mode: Optional[str] = None  # offline | online | disabled; null: WANDB_MODE when set, else offline
    name: Optional[str] = None  # null: the run folder's name
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    dir: str = "."  # relative to the run folder (or absolute)

    def __post_init__(self):
        if self.mode is not None:
            check_choice("logger.wandb.mode", self.mode, WANDB_MODES)


@dataclass
class MlflowConfig:
    """``logger=[mlflow]``: an MLflow run per nfvi run, by default in a file store ``<run folder>/mlruns``."""

    tracking_uri: Optional[str] = None  # null: MLFLOW_TRACKING_URI when set, else file:<run folder>/mlruns
    experiment: str = "nfvi"
    run_name: Optional[str] = None  # null: the run folder's name


@dataclass
class LoggerConfig:
    """The ``logger`` group: which trackers a run feeds (``logger=[csv,tensorboard]``); null ones are off."""

    csv: Optional[CsvConfig] = field(default_factory=CsvConfig)
    tensorboard: Optional[TensorBoardConfig] = None
    wandb: Optional[WandbConfig] = None
    mlflow: Optional[MlflowConfig] = None


# ---------------------------------------------------------------------------------------------------------------------
# What the trackers receive


def flatten_config(node, prefix: str = "") -> dict:
    """A nested dict as ``{"a.b.c": value}`` (lists and scalars are leaves; an empty dict is a leaf)."""
    out = {}
    for key, value in (node or {}).items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, name))
        else:
            out[name] = value
    return out


def scalars(row: dict) -> dict[str, float]:
    """The numeric fields of a metrics row or of results (bools and text left out, NaN kept)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _results(results: dict) -> dict:
    """``results.json``'s dict without its copy of the config (logged once already)."""
    return {k: v for k, v in results.items() if k != "config"}


def _require(module: str, tracker: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise NfviError(
            f"logger={tracker} needs the {module.split('.')[0]} package ({exc}); install it with: {INSTALL_HINT}"
        ) from None


def _inside(out: Path, folder: str) -> Path:
    path = Path(folder)
    return path if path.is_absolute() else out / path


class Tracker:
    """One tracker of a run. Subclasses write to one backend."""

    name = ""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def log_config(self, config: dict) -> None:
        raise NotImplementedError

    def log_results(self, results: dict) -> None:
        raise NotImplementedError

    def rewind(self, step: int) -> None:
        """The run resumes from its checkpoint at ``step``: rows logged after it are logged again. Default: keep
        what was sent (W&B and MLflow cannot take back logged values; their charts show both)."""

    def close(self, failed: bool = False) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Scalars through ``torch.utils.tensorboard``; the config as text, then with the results as HParams."""

    name = "tensorboard"

    def __init__(self, cfg: TensorBoardConfig, out: Path, run_id: str | None = None):
        _require("tensorboard", self.name)
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = str(_inside(out, cfg.dir))
        self.writer = SummaryWriter(log_dir=self.log_dir)
        self.config: dict = {}
        self.step = 0

    def rewind(self, step):
        """Reopen the writer with ``purge_step=step + 1``: TensorBoard then drops the earlier files' events after
        ``step`` (those of the interrupted launch past its checkpoint)."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer.close()
        self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=step + 1)

    def log_metrics(self, step, metrics):
        self.step = step
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_config(self, config):
        import yaml

        self.config = flatten_config(config)
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log_results(self, results):
        from torch.utils.tensorboard.summary import hparams

        numbers = {f"results/{k}": v for k, v in scalars(results).items()}
        for key, value in numbers.items():
            self.writer.add_scalar(key, value, self.step)
        self.writer.add_text("results", "```\n" + json.dumps(results, indent=2, default=str) + "\n```", self.step)
        allowed = (int, float, str, bool)
        params = {k: v if isinstance(v, allowed) else json.dumps(v) for k, v in self.config.items()}
        for summary in hparams(params, {k: v for k, v in numbers.items() if math.isfinite(v)}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def close(self, failed=False):
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run: each metrics row through ``run.log`` (``step`` one of its fields), results in its summary."""

    name = "wandb"

    def __init__(self, cfg: WandbConfig, out: Path, run_id: str | None = None):
        wandb = _require("wandb", self.name)
        folder = _inside(out, cfg.dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            id=run_id,  # the nfvi run's id: a resumed run continues its W&B run
            resume="allow" if run_id else None,
            project=cfg.project,
            entity=cfg.entity,
            mode=cfg.mode or os.environ.get("WANDB_MODE") or "offline",
            name=cfg.name or out.name,
            group=cfg.group,
            tags=list(cfg.tags) or None,
            dir=str(folder),
            settings=wandb.Settings(console="off", silent=True),
        )

    def log_metrics(self, step, metrics):
        self.run.log({"step": step, **metrics})  # W&B's own step counts rows: cde's steps restart with each seed

    def log_config(self, config):
        self.run.config.update(config, allow_val_change=True)

    def log_results(self, results):
        self.run.summary.update({f"results/{k}": v for k, v in scalars(results).items()})
        self.run.summary.update({"results": json.loads(json.dumps(results, default=str))})

    def close(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker(Tracker):
    """An MLflow run through ``MlflowClient``: metrics at the row's step, the config as params and artifact."""

    name = "mlflow"

    def __init__(self, cfg: MlflowConfig, out: Path, run_id: str | None = None):
        _require("mlflow", self.name)
        uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow 3 keeps its file store behind this switch (a database needs a server or migrations)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (out / "mlruns").resolve().as_uri()
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.experiment)
        found = []
        if run_id:  # a resumed run continues the MLflow run tagged with its nfvi run id
            found = self.client.search_runs([experiment_id], f"tags.`{RUN_ID_TAG}` = '{run_id}'", max_results=1)
        self.logged: dict = {}  # params of the run's earlier launches: MLflow refuses to change a param
        if found:
            self.run_id = found[0].info.run_id
            self.logged = dict(found[0].data.params)
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {RUN_ID_TAG: run_id} if run_id else None
            name = cfg.run_name or out.name
            self.run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def log_metrics(self, step, metrics):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_config(self, config):
        from mlflow.entities import Param

        params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in flatten_config(config).items()]
        params = [p for p in params if p.key not in self.logged]  # a resumed run keeps its first launch's (resume=...)
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_dict(self.run_id, config, "config.yaml")  # this launch's

    def log_results(self, results):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"results/{k}", v, now, 0) for k, v in scalars(results).items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.client.log_dict(self.run_id, json.loads(json.dumps(results, default=str)), "results.json")

    def close(self, failed=False):
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


_ADAPTERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The trackers of one run; each call goes to each of them (none: every call does nothing)."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = list(trackers)
        self.rows = 0

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def log_row(self, row: dict) -> None:
        """A row of ``metrics.csv``: its numeric fields but ``step``, at ``step`` (else at the row's number)."""
        self.rows += 1
        numbers = scalars(row)
        step = int(numbers.pop("step", self.rows))
        for tracker in self.trackers:
            tracker.log_metrics(step, numbers)

    def log_config(self, config: dict) -> None:
        for tracker in self.trackers:
            tracker.log_config(config)

    def log_results(self, results: dict) -> None:
        for tracker in self.trackers:
            tracker.log_results(_results(results))

    def rewind(self, step: int) -> None:
        """The run resumes from its checkpoint at ``step`` (:meth:`nfvi.runs.MetricsLog.truncate_after`)."""
        for tracker in self.trackers:
            tracker.rewind(step)

    def close(self, failed: bool = False) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(failed)

    def __bool__(self) -> bool:
        return bool(self.trackers)


def open_trackers(logger_cfg, out: str | Path, config: dict | None = None, run_id: str | None = None) -> Trackers:
    """Start the trackers that ``logger_cfg`` (a command's ``cfg.logger``; None: none) selects for the run in
    ``out`` and send them ``config`` (the resolved config). ``csv`` is :class:`nfvi.runs.MetricsLog`'s own.
    ``run_id`` (the nfvi run's, :meth:`nfvi.runs.Run.save_record`): a resumed run continues its W&B and MLflow runs."""
    out = Path(out)
    started: list[Tracker] = []
    try:
        for name, adapter in _ADAPTERS.items():
            options = None if logger_cfg is None else logger_cfg.get(name)
            if options is not None:
                started.append(adapter(options, out, run_id))
        trackers = Trackers(started)
        if config is not None:
            trackers.log_config(config)
    except BaseException:
        Trackers(started).close(failed=True)
        raise
    return trackers
