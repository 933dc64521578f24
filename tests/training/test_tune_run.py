"""Torchtune's own FSDP2 SFT and DPO recipes, unmodified, on mla_tiny with the project's configs (CPU, gloo).

One SFT run (``tune run --nproc_per_node 2 full_finetune_distributed``) is shared by the tests of this module:
losses fall, every epoch is an HF directory transformers loads, W&B (offline) and MLflow recorded the run and the
final epoch is a registered MLflow model version, DPO starts from it, and a SIGKILLed run resumes exactly.
"""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mla_components.checkpointing import epoch_dirs, load_hf_checkpoint
from tests.training._tune import ENV, REPO, logged_metrics, tune_command, tune_run

SFT = "mla_tiny/sft_distributed.yaml"
EPOCHS, STEPS = 3, 4
# short and fast, but every mechanism on: 3 epochs (2 intermediate checkpoints), 2 ranks, the config's data
SHORT = (f"epochs={EPOCHS}", f"max_steps_per_epoch={STEPS}", "batch_size=4", "dataset.num_samples=64")
DISK_ONLY = ("metric_logger._component_=torchtune.training.metric_logging.DiskLogger",)


def _sft_args(root: Path, name: str, *extra: str) -> tuple[str, ...]:
    return (f"output_dir={root / name}", f"checkpointer.checkpoint_dir={root / 'init'}", *SHORT, *extra)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tune")
    tune_run("full_finetune_distributed", SFT, *_sft_args(root, "sft"), nproc=2)
    return root


def test_sft_loss_falls_and_every_epoch_is_an_hf_checkpoint(sft_run):
    rows = [r for r in logged_metrics(sft_run / "sft" / "logs") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, EPOCHS * STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert max(losses[-STEPS:]) < min(losses[:2]), losses  # last epoch below the start
    assert [n for n, _ in epoch_dirs(sft_run / "sft", resumable=False)] == [0, 1, 2]
    assert [n for n, _ in epoch_dirs(sft_run / "sft", resumable=True)] == [0, 1]  # the final epoch holds no state

    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = sft_run / "sft" / "epoch_2"
    hf_model, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True, dtype=torch.float32)
    assert not any(info.values()), info
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert (
        tokenizer.decode(tokenizer.encode("The pass key is 123.", add_special_tokens=False)) == "The pass key is 123."
    )
    _, state = load_hf_checkpoint(final)
    _, init_state = load_hf_checkpoint(sft_run / "init")
    assert not torch.equal(state["tok_embeddings.weight"], init_state["tok_embeddings.weight"])  # it trained


def test_sft_run_is_tracked_in_wandb_offline_and_registered_in_mlflow(sft_run):
    assert list((sft_run / "sft" / "wandb").rglob("offline-run-*/run-*.wandb")), "no offline W&B run"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{sft_run / 'sft' / 'mlflow.db'}")
    versions = client.search_model_versions("name='mla_tiny_sft'")
    assert [int(v.version) for v in versions] == [1]
    run = client.get_run(versions[0].run_id)
    assert run.data.metrics["loss"] > 0 and run.data.params["model._component_"] == "mla_components.models.mla_tiny"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json"} <= artifacts


def test_dpo_starts_from_the_sft_checkpoint_and_completes(sft_run):
    tune_run(
        "full_dpo_distributed",
        "mla_tiny/dpo_distributed.yaml",
        f"output_dir={sft_run / 'dpo'}",
        f"checkpointer.checkpoint_dir={sft_run / 'sft' / 'epoch_2'}",
        "max_steps_per_epoch=3",
        "batch_size=2",
        "dataset.num_samples=32",
        nproc=2,
    )
    rows = [r for r in logged_metrics(sft_run / "dpo" / "logs") if "loss" in r]
    assert len(rows) == 3 and all(r["loss"] > 0 for r in rows)
    # a policy equal to its reference scores both answers alike: the first DPO loss is log(2)
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    _, dpo_state = load_hf_checkpoint(sft_run / "dpo" / "epoch_0")
    _, sft_state = load_hf_checkpoint(sft_run / "sft" / "epoch_2")
    assert not torch.equal(dpo_state["output.weight"], sft_state["output.weight"])


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _running(pids: list[int]) -> list[int]:
    """Those of ``pids`` that still run (zombies, exited but not reaped, do not)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def _tree(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def test_sigkilled_run_resumes_with_the_same_losses_and_weights(sft_run):
    """SIGKILL the launcher's process group right after the first checkpoint (what users and schedulers do): the
    ranks, which torchrun starts in sessions of their own, die with it and nothing writes afterwards. Resume, and
    compare with the uninterrupted run: same losses step by step, same final weights."""
    args = _sft_args(sft_run, "killed", *DISK_ONLY, "metric_logger.log_dir=${output_dir}/logs")
    proc = subprocess.Popen(
        tune_command("full_finetune_distributed", SFT, *args, nproc=2),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (sft_run / "killed" / "epoch_0" / "recipe_state.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before the first checkpoint"
        time.sleep(0.05)
    workers = _descendants(proc.pid)
    assert workers, "no torchrun workers"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        deadline = time.monotonic() + 5  # the parent-death signal is immediate; the run's next epochs take longer
        while _running(workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(workers), "ranks outlived their launcher"
        written = _tree(sft_run / "killed")
        time.sleep(3)
        assert _tree(sft_run / "killed") == written, "something kept writing after the launcher was killed"
    finally:
        for pid in _running(workers):
            os.kill(pid, signal.SIGKILL)
    assert not (sft_run / "killed" / f"epoch_{EPOCHS - 1}").exists(), "killed too late: the run had finished"
    resume_from = epoch_dirs(sft_run / "killed", resumable=True)[-1][0]  # epoch_0, or epoch_1 on a slow poll

    tune_run("full_finetune_distributed", SFT, *args, "resume_from_checkpoint=True", nproc=2)

    reference = {r["step"]: r["loss"] for r in logged_metrics(sft_run / "sft" / "logs") if "loss" in r}
    resumed_rows = [r for r in logged_metrics(sft_run / "killed" / "logs") if "loss" in r]
    first_step = (resume_from + 1) * STEPS + 1  # the first step of the epoch after the checkpoint
    resumed = {r["step"]: r["loss"] for r in resumed_rows[-(EPOCHS * STEPS - first_step + 1) :]}
    assert sorted(resumed) == list(range(first_step, EPOCHS * STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-4, abs=1e-5), step
    _, final = load_hf_checkpoint(sft_run / "killed" / "epoch_2")
    _, expected = load_hf_checkpoint(sft_run / "sft" / "epoch_2")
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_single_device_sft_config_trains_and_checkpoints(tmp_path):
    """``configs/mla_tiny/sft_single_device.yaml`` with Torchtune's ``full_finetune_single_device``."""
    tune_run(
        "full_finetune_single_device",
        "mla_tiny/sft_single_device.yaml",
        f"output_dir={tmp_path / 'sft'}",
        f"checkpointer.checkpoint_dir={tmp_path / 'init'}",
        "epochs=1",
        f"max_steps_per_epoch={STEPS}",
        "batch_size=4",
        "dataset.num_samples=16",
        *DISK_ONLY,
        f"metric_logger.log_dir={tmp_path / 'sft' / 'logs'}",
    )
    losses = [r["loss"] for r in logged_metrics(tmp_path / "sft" / "logs") if "loss" in r]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert [n for n, _ in epoch_dirs(tmp_path / "sft", resumable=False)] == [0]
    load_hf_checkpoint(tmp_path / "sft" / "epoch_0")


def test_generation_config_decodes_from_a_trained_checkpoint(sft_run):
    """``configs/mla_tiny/generation.yaml`` with the project's ``generate`` recipe (Torchtune's, with decode steps
    replayed from a CUDA graph on CUDA) and with Torchtune's own: cached decode over the latent cache from the last
    SFT epoch, the same text from both."""
    last = epoch_dirs(sft_run / "sft", resumable=False)[-1][1]
    texts = []
    for recipe in ("mla_recipes/generate.py", "generate"):
        proc = tune_run(recipe, "mla_tiny/generation.yaml", f"checkpointer.checkpoint_dir={last}", "max_new_tokens=8")
        output = proc.stdout + proc.stderr
        assert re.search(r"Time for inference: [0-9.]+ sec total, [0-9.]+ tokens/sec", output), output[-2000:]
        start = output.index("The pass key is 41592")  # the prompt, echoed with the generation
        texts.append(output[start : output.index("Time for inference", start)])
    assert texts[0] == texts[1]
