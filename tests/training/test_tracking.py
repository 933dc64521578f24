"""MLflow artifacts (the config, registered checkpoints) stay under the run's output_dir, not the working directory."""

import mlflow

from mla_components.checkpointing import write_hf_checkpoint
from mla_components.models import mla
from mla_components.tracking import MLflowLogger
from tests.model.conftest import small_config


def test_mlflow_artifacts_go_under_output_dir_unless_the_config_names_a_store(tmp_path, monkeypatch):
    model = mla(small_config())
    out = tmp_path / "out"
    write_hf_checkpoint(out / "epoch_0", model.state_dict(), model.mla_config.to_hf_config())
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    logger = MLflowLogger(tracking_uri=uri, experiment_name="t", register_model_name="m", checkpoint_root=str(out))
    logger.log("loss", 1.0, 1)
    logger.close()
    assert logger.registered_version is not None
    assert list(cwd.iterdir()) == []  # MLflow's default for a SQLite store: ./mlruns
    assert list((out / "mlruns").rglob("model/model.safetensors"))

    store = tmp_path / "store"
    named = MLflowLogger(tracking_uri=uri, experiment_name="named", artifact_location=store.as_uri())
    named.close()
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_experiment_by_name("named").artifact_location == store.as_uri()
    assert client.get_experiment_by_name("t").artifact_location == (out / "mlruns").as_uri()
