"""Experiment tracking for Torchtune's recipes: several loggers at once, and MLflow model registration.

Torchtune's recipes instantiate exactly one ``metric_logger``. ``MultiLogger`` fans out to several of Torchtune's
own loggers (``DiskLogger``, ``WandBLogger`` with ``mode: offline``, ``MLFlowLogger`` with a local store), chosen
per config::

    metric_logger:
      _component_: mla_components.tracking.MultiLogger
      loggers:
        - {_component_: torchtune.training.metric_logging.DiskLogger, log_dir: ${output_dir}/logs}
        - {_component_: torchtune.training.metric_logging.WandBLogger, project: mla, mode: offline, dir: ${output_dir}}
        - _component_: mla_components.tracking.MLflowLogger
          tracking_uri: file://${output_dir}/mlruns
          register_model_name: mla_tiny_sft
          checkpoint_root: ${output_dir}

With a local SQLite store, MLflow would put artifacts (the config, registered checkpoints) in ``./mlruns`` of
whatever directory the run started from; ``MLflowLogger`` puts them in ``${output_dir}/mlruns`` instead unless the
config names ``artifact_location``.
"""

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torchtune import config as tt_config
from torchtune.training.metric_logging import MetricLoggerInterface, MLFlowLogger, Scalar
from torchtune.utils import get_world_size_and_rank

from mla_components.checkpointing import epoch_dirs


class MultiLogger(MetricLoggerInterface):
    """Send every metric and the config to each of ``loggers`` (instances or ``_component_`` configs)."""

    def __init__(self, loggers: list[MetricLoggerInterface | Mapping[str, Any]]) -> None:
        if not loggers:
            raise ValueError("metric_logger.loggers is empty: list at least one logger (e.g. DiskLogger)")
        self._loggers = [
            tt_config.instantiate(DictConfig(dict(item))) if isinstance(item, Mapping) else item for item in loggers
        ]

    def log(self, name: str, data: Scalar, step: int) -> None:
        for logger in self._loggers:
            logger.log(name, data, step)

    def log_dict(self, payload: Mapping[str, Scalar], step: int) -> None:
        for logger in self._loggers:
            logger.log_dict(payload, step)

    def log_config(self, config: DictConfig) -> None:
        for logger in self._loggers:
            logger.log_config(config)

    def close(self) -> None:
        for logger in self._loggers:
            logger.close()


def register_checkpoint(checkpoint_dir: str | Path, model_name: str, run_id: str) -> Any:
    """Log ``checkpoint_dir`` (an HF directory) as the run's ``model`` artifacts and register them as a new version
    of ``model_name``; returns the MLflow ``ModelVersion``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    client.log_artifacts(run_id, str(checkpoint_dir), artifact_path="model")
    try:
        client.create_registered_model(model_name)
    except MlflowException as e:  # already registered: add a version
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    return client.create_model_version(model_name, source=source, run_id=run_id)


def default_artifact_location(tracking_uri: str | None, checkpoint_root: str | Path | None) -> str | None:
    """Where a run's artifacts go when the config names no ``artifact_location``: for a local SQLite store,
    ``<checkpoint_root>/mlruns`` (or ``mlruns`` next to the database file); otherwise the store decides (None)."""
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        return None
    root = Path(checkpoint_root) if checkpoint_root else Path(tracking_uri.removeprefix("sqlite:///")).parent
    return (root / "mlruns").resolve().as_uri()


class MLflowLogger(MLFlowLogger):
    """Torchtune's ``MLFlowLogger`` that, when the run closes, registers the newest ``epoch_N`` checkpoint of
    ``checkpoint_root`` as a version of the MLflow model ``register_model_name`` (None: no registration).

    ``artifact_location`` (a directory or URI) is used when the experiment is created; by default, with a local
    SQLite ``tracking_uri``, it is ``<checkpoint_root>/mlruns`` (see :func:`default_artifact_location`). Without
    ``experiment_name`` (or ``MLFLOW_EXPERIMENT_NAME``) the experiment is ``mla_components`` then, because MLflow's
    ``Default`` experiment keeps the location it was created with.
    """

    def __init__(
        self,
        *,
        register_model_name: str | None = None,
        checkpoint_root: str | None = None,
        artifact_location: str | None = None,
        **kwargs: Any,
    ) -> None:
        if register_model_name is not None and checkpoint_root is None:
            raise ValueError("metric_logger: register_model_name needs checkpoint_root (the run's output_dir)")
        tracking_uri = kwargs.get("tracking_uri") or os.getenv("MLFLOW_TRACKING_URI")
        location = artifact_location or default_artifact_location(tracking_uri, checkpoint_root)
        if location is not None and get_world_size_and_rank()[1] == 0:
            import mlflow

            name = kwargs.get("experiment_name") or os.getenv("MLFLOW_EXPERIMENT_NAME") or "mla_components"
            client = mlflow.MlflowClient(tracking_uri=tracking_uri)
            if client.get_experiment_by_name(name) is None:
                client.create_experiment(name, artifact_location=location)
            kwargs["experiment_name"] = name
        super().__init__(**kwargs)
        self._register_model_name = register_model_name
        self._checkpoint_root = checkpoint_root
        self.registered_version: Any = None

    def close(self) -> None:
        if self.rank == 0 and self._register_model_name and self._mlflow.active_run():
            found = epoch_dirs(self._checkpoint_root, resumable=False)
            if found:
                self.registered_version = register_checkpoint(found[-1][1], self._register_model_name, self._run_id)
        super().close()


_METRIC = re.compile(r"(\w+):(-?[\d.e+-]+|nan)")


def logged_metrics(log_dir: str | Path) -> list[dict[str, float]]:
    """The ``Step N | loss:.. lr:..`` lines of Torchtune's ``DiskLogger`` files in ``log_dir``, in file order."""
    rows = []
    for path in sorted(Path(log_dir).glob("log_*.txt")):
        for line in path.read_text().splitlines():
            step, _, rest = line.partition(" | ")
            row = {k: float(v) for k, v in _METRIC.findall(rest)}
            if row:
                rows.append({"step": int(step.removeprefix("Step ")), **row})
    return rows
