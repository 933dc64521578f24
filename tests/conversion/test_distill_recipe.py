"""The full-parameter distillation recipe (``mla_recipes/distill_full.py``) through ``tune run``, on tiny models:
the student moves toward the teacher, and a run resumed from its intermediate epoch ends bit-identical."""

import shutil
import subprocess

import pytest
from safetensors.torch import load_file

from mla_components.checkpointing.init import write_initial_checkpoint
from mla_components.tracking import logged_metrics
from tests.training._tune import ENV, REPO, tune_command, tune_run

RECIPE = "mla_recipes/distill_full.py"
CONFIG = "smollm2_135m/heal_mla_256.yaml"


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A random mla_tiny teacher and a differently seeded mla_tiny student (byte tokenizer)."""
    root = tmp_path_factory.mktemp("kd")
    return write_initial_checkpoint("mla_tiny", root / "teacher", seed=0), write_initial_checkpoint(
        "mla_tiny", root / "student", seed=1
    )


def overrides(teacher, student, output_dir, *extra):
    return [
        "device=cpu",
        "dtype=fp32",
        "model._component_=mla_components.models.mla_tiny",
        "~model.kv_lora_rank",
        f"checkpointer.checkpoint_dir={student}",
        "teacher_model._component_=mla_components.models.mla_tiny",
        f"teacher_checkpointer.checkpoint_dir={teacher}",
        "tokenizer._component_=mla_components.data.byte_tokenizer",
        "~tokenizer.path",
        "tokenizer.max_seq_len=256",
        "dataset.corpus.seq_len=128",
        "dataset.corpus.repeats=1",
        "dataset.needles.context_tokens=256",
        "dataset.needles.needle_kinds=[passkey]",
        "dataset.needles.num_samples=16",
        "batch_size=4",
        "num_workers=0",
        "optimizer.lr=3e-3",
        "lr_scheduler.num_warmup_steps=1",
        "log_every_n_steps=1",
        f"output_dir={output_dir}",
        *extra,
    ]


def test_distillation_lowers_the_kl_and_resumes_exactly(tiny_pair, tmp_path):
    teacher, student = tiny_pair
    run = tmp_path / "run"
    tune_run(RECIPE, CONFIG, *overrides(teacher, student, run, "epochs=2", "max_steps_per_epoch=8"))
    kls = [m["kl"] for m in logged_metrics(run / "logs")]
    assert len(kls) == 16
    assert sum(kls[-4:]) / 4 < 0.7 * sum(kls[:4]) / 4, kls
    assert (run / "epoch_0" / "recipe_state.pt").is_file() and (run / "epoch_1" / "config.json").is_file()

    # a run killed after its intermediate epoch: resume recomputes the last epoch to the same weights
    resumed = tmp_path / "resumed"
    tune_run(RECIPE, CONFIG, *overrides(teacher, student, resumed, "epochs=2", "max_steps_per_epoch=8"))
    shutil.rmtree(resumed / "epoch_1")
    tune_run(
        RECIPE,
        CONFIG,
        *overrides(teacher, student, resumed, "epochs=2", "max_steps_per_epoch=8", "resume_from_checkpoint=True"),
    )
    first, second = (
        load_file(run / "epoch_1" / "model.safetensors"),
        load_file(resumed / "epoch_1" / "model.safetensors"),
    )
    assert first.keys() == second.keys()
    assert all((first[k] == second[k]).all() for k in first)


def test_a_trainable_pattern_matching_nothing_is_refused(tiny_pair, tmp_path):
    teacher, student = tiny_pair
    proc = subprocess.run(
        tune_command(RECIPE, CONFIG, *overrides(teacher, student, tmp_path / "x", "trainable=[nothing.*]")),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "trainable: ['nothing.*'] matches no parameter" in proc.stderr + proc.stdout
