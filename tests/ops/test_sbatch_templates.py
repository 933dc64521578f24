"""The sbatch templates submitted to the real (local) Slurm cluster with the tiny configs, on CPU/gloo.

SFT on one node (torchrun --standalone, one process per allocated fake GPU), DPO and passkey evaluation from its
checkpoint, SFT on two nodes (one srun task per node, c10d rendezvous on the head node's NodeAddr), and a job
requeued mid-run that resumes from its last intermediate epoch.
"""

import re
import time
from pathlib import Path

import pytest
import torch

from mla_components.checkpointing import epoch_dirs, latest_resumable_epoch, load_hf_checkpoint

SFT_CONFIG = "configs/mla_tiny/sft_distributed.yaml"
STEPS = 2
# A few steps on the smallest needle samples the byte tokenizer allows (a passkey chat needs >= 240 tokens);
# metrics to a plain file only.
TINY = (
    f"max_steps_per_epoch={STEPS}",
    "batch_size=2",
    "dataset.num_samples=16",
    "dataset.context_tokens=256",
    "tokenizer.max_seq_len=256",
    "metric_logger._component_=torchtune.training.metric_logging.DiskLogger",
    "metric_logger.log_dir=${output_dir}/logs",
)
_STEP = re.compile(r"^Step (\d+) \| loss:(\S+)", re.M)


def job_env(cluster) -> dict[str, str]:
    runs = cluster.root / "runs"
    return {
        "CONFIG": SFT_CONFIG,
        "RUNS_ROOT": str(runs),
        "CHECKPOINT_DIR": str(runs / "init"),
        "INIT_MODEL": "mla_tiny",
        "DEVICE": "cpu",
    }


def steps_per_run(output_dir: Path) -> list[list[tuple[int, float]]]:
    """``[(step, loss), ...]`` of each run's DiskLogger file, oldest run first."""
    files = sorted(Path(output_dir, "logs").glob("log_*.txt"), key=lambda p: int(p.stem.split("_")[1]))
    return [[(int(s), float(loss)) for s, loss in _STEP.findall(f.read_text())] for f in files]


def node_logs(output_dir: Path, job_id: str, restart: int = 0) -> list[Path]:
    return sorted(Path(output_dir, "slurm_logs", f"job{job_id}-restart{restart}").glob("node*.log"))


def assert_trained_checkpoint(epoch_dir: Path, init_dir: Path) -> None:
    _, state = load_hf_checkpoint(epoch_dir)
    _, init_state = load_hf_checkpoint(init_dir)
    assert state.keys() == init_state.keys()
    assert not torch.equal(state["tok_embeddings.weight"], init_state["tok_embeddings.weight"])


@pytest.fixture(scope="module")
def sft_job(slurm_cluster) -> tuple[str, Path]:
    """One single-node SFT job (2 processes: one per fake GPU allocated), shared by the SFT, DPO and eval tests."""
    env = job_env(slurm_cluster)
    job = slurm_cluster.sbatch("--gpus-per-node=2", "--cpus-per-task=2", "slurm/sft.sbatch", "epochs=1", *TINY, env=env)
    slurm_cluster.wait_for(job, {"COMPLETED"})
    return job, Path(env["RUNS_ROOT"]) / "mla-sft"  # per job *name*, not id


def test_sft_template_single_node_completes_with_a_checkpoint(slurm_cluster, sft_job):
    job, output = sft_job
    assert slurm_cluster.job_field(job, "JobState") == "COMPLETED"
    assert [n for n, _ in epoch_dirs(output, resumable=False)] == [0]
    assert_trained_checkpoint(output / "epoch_0", Path(job_env(slurm_cluster)["CHECKPOINT_DIR"]))
    (run,) = steps_per_run(output)
    assert [s for s, _ in run] == list(range(1, STEPS + 1))
    (log,) = node_logs(output, job)
    # torchrun --standalone with one process per GPU Slurm allocated on the node (SLURM_GPUS_ON_NODE=2)
    assert "global_world_sizes=[2, 2]" in log.read_text(), log.read_text()[-3000:]


def test_dpo_template_trains_from_the_sft_checkpoint(slurm_cluster, sft_job):
    _, sft_output = sft_job
    env = {
        **job_env(slurm_cluster),
        "CONFIG": "configs/mla_tiny/dpo_distributed.yaml",
        "CHECKPOINT_DIR": str(sft_output / "epoch_0"),
    }
    del env["INIT_MODEL"]
    # 256 tokens fit the passkey kind only (the config's multi-needle kind needs 380: preflight refuses it)
    overrides = (
        f"max_steps_per_epoch={STEPS}",
        "batch_size=2",
        "dataset.num_samples=8",
        "dataset.context_tokens=256",
        "dataset.needle_kinds=[passkey]",
    )
    job = slurm_cluster.sbatch("--gpus-per-node=1", "--cpus-per-task=1", "slurm/dpo.sbatch", *overrides, env=env)
    assert slurm_cluster.wait_for(job, {"COMPLETED"}) == "COMPLETED"
    output = Path(env["RUNS_ROOT"]) / "mla-dpo"
    (run,) = steps_per_run(output)
    assert [s for s, _ in run] == list(range(1, STEPS + 1))
    assert_trained_checkpoint(output / "epoch_0", sft_output / "epoch_0")  # moved away from the SFT weights


def test_eval_template_scores_the_sft_checkpoint(slurm_cluster, sft_job):
    _, sft_output = sft_job
    env = {
        **job_env(slurm_cluster),
        "CONFIG": "configs/mla_tiny/passkey_eval.yaml",
        "CHECKPOINT_DIR": str(sft_output / "epoch_0"),
    }
    del env["INIT_MODEL"]
    grid = ("context_lengths=[256]", "depths=[0.5]", "trials_per_cell=2", "progress=False")
    job = slurm_cluster.sbatch("--gpus-per-node=1", "--cpus-per-task=1", "slurm/eval.sbatch", *grid, env=env)
    assert slurm_cluster.wait_for(job, {"COMPLETED"}) == "COMPLETED"
    output = Path(env["RUNS_ROOT"]) / "mla-eval"
    results = sorted(p.name for p in output.iterdir() if p.is_file())
    assert any(name.endswith(".json") for name in results) and any(name.endswith(".csv") for name in results), results


def test_sft_multinode_template_runs_on_two_nodes_with_a_c10d_rendezvous(slurm_cluster):
    env = job_env(slurm_cluster)
    job = slurm_cluster.sbatch(
        "--gpus-per-node=1", "--cpus-per-task=1", "slurm/sft_multinode.sbatch", "epochs=1", *TINY, env=env
    )
    assert slurm_cluster.wait_for(job, {"COMPLETED"}) == "COMPLETED"
    assert slurm_cluster.job_field(job, "NodeList") == "n[1-2]"

    output = Path(env["RUNS_ROOT"]) / "mla-sft-multinode"
    logs = node_logs(output, job)
    assert [p.name.split("-")[0] for p in logs] == ["node0", "node1"]  # one log per node
    endpoint = f"127.0.0.1:{29500 + int(job) % 1000}"  # the head node's NodeAddr, port from the job id
    group_ranks = set()
    for log in logs:
        text = log.read_text()
        assert endpoint in text, text[-3000:]
        assert re.search(r"group_world_size=2\b", text) and re.search(r"global_world_sizes=\[2\]", text)
        group_ranks.add(int(re.search(r"group_rank=(\d+)", text).group(1)))
    assert group_ranks == {0, 1}
    assert_trained_checkpoint(output / "epoch_0", Path(env["CHECKPOINT_DIR"]))


def test_requeued_job_resumes_from_its_last_intermediate_epoch(slurm_cluster):
    env = job_env(slurm_cluster)
    name = "ops-requeue"
    output = Path(env["RUNS_ROOT"]) / name
    job = slurm_cluster.sbatch(
        f"--job-name={name}", "--gpus-per-node=1", "--cpus-per-task=1", "slurm/sft.sbatch", "epochs=2", *TINY, env=env
    )
    deadline = time.monotonic() + 240
    while latest_resumable_epoch(output) is None:  # epoch 0 saved with its recipe state: epoch 1 is running
        assert time.monotonic() < deadline, "no intermediate checkpoint within 240 s"
        assert slurm_cluster.job_field(job, "JobState") in {"PENDING", "RUNNING"}
        time.sleep(0.5)

    slurm_cluster.cmd("scontrol", "requeue", job)  # what preemption with PreemptMode=REQUEUE does
    slurm_cluster.wait_for(job, {"PENDING"}, timeout=60)
    assert slurm_cluster.job_field(job, "Restarts") == "1"
    slurm_cluster.cmd("scontrol", "update", f"JobId={job}", "StartTime=now")  # skip Slurm's 120 s requeue delay
    assert slurm_cluster.wait_for(job, {"COMPLETED"}) == "COMPLETED"

    batch_log = (slurm_cluster.root / f"{name}-{job}.out").read_text()
    assert f"resuming from {output / 'epoch_0'}" in batch_log, batch_log
    (restart_log,) = node_logs(output, job, restart=1)
    assert "resume_from_checkpoint: true" in restart_log.read_text()
    # the resumed run trained epoch 1 only (global steps STEPS+1..2*STEPS), continuing the first run exactly
    first, resumed = steps_per_run(output)
    assert [s for s, _ in resumed] == list(range(STEPS + 1, 2 * STEPS + 1))
    assert [s for s, _ in first][:STEPS] == list(range(1, STEPS + 1))
    first_losses = dict(first)
    for step, loss in resumed:
        if step in first_losses:  # the first run got this far before the requeue killed it
            assert loss == pytest.approx(first_losses[step], rel=1e-5)
    assert [n for n, _ in epoch_dirs(output, resumable=False)] == [0, 1]
    assert_trained_checkpoint(output / "epoch_1", Path(env["CHECKPOINT_DIR"]))
