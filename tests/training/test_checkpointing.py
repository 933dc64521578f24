"""HF-directory checkpoints: transformers loads what we write, bad files are refused by name, writes are atomic."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mla_components.checkpointing import (
    AtomicHFCheckpointer,
    epoch_dirs,
    latest_resumable_epoch,
    load_hf_checkpoint,
    write_hf_checkpoint,
)
from mla_components.checkpointing._lock import LOCK_NAME, OutputDirLockedError
from mla_components.cli import main as mla_tune
from mla_components.models import MLAConfig, gqa_tiny, mla, mla_tiny
from tests.model.conftest import randomize_, small_config


def _hf_config(model):
    return model.mla_config.to_hf_config() if hasattr(model, "mla_config") else dict(model.hf_config)


@pytest.mark.parametrize("builder", [lambda: mla(small_config()), lambda: gqa_tiny()], ids=["mla", "gqa"])
def test_transformers_loads_what_we_write_with_equal_logits(tmp_path, builder):
    model = randomize_(builder()).eval()
    write_hf_checkpoint(tmp_path / "ckpt", model.state_dict(), _hf_config(model))

    hf_model, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", output_loading_info=True, dtype=torch.float32, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tokens = torch.randint(0, model.tok_embeddings.num_embeddings, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf_model.eval()(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_round_trip_is_exact_and_keeps_config(tmp_path):
    model = randomize_(mla_tiny())
    config = model.mla_config.to_hf_config()
    write_hf_checkpoint(tmp_path / "a", model.state_dict(), config)
    loaded_config, state = load_hf_checkpoint(tmp_path / "a")
    assert {k: loaded_config[k] for k in config} == config
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key


def test_corrupted_weights_are_refused_by_file_name(tmp_path):
    model = mla(small_config())
    write_hf_checkpoint(tmp_path / "c", model.state_dict(), model.mla_config.to_hf_config())
    weights = tmp_path / "c" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated, as by a full disk
    with pytest.raises(ValueError, match="corrupted checkpoint file .*model.safetensors: it has .* bytes"):
        load_hf_checkpoint(tmp_path / "c")  # by the manifest
    (tmp_path / "c" / "checkpoint_manifest.json").unlink()  # a directory of another tool: its header is checked
    with pytest.raises(ValueError, match="corrupted safetensors file .*model.safetensors"):
        load_hf_checkpoint(tmp_path / "c")


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    model = mla(small_config())
    write_hf_checkpoint(tmp_path / "k", model.state_dict(), model.mla_config.to_hf_config())
    (tmp_path / "k" / "checkpoint_manifest.json").unlink()  # the weights are edited below
    weights = tmp_path / "k" / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.self_attn.kv_b_proj.weight"]
    state["model.layers.0.self_attn.q_a_proj.weight"] = torch.zeros(3, 3)
    state["model.layers.9.self_attn.kv_b_proj.weight"] = torch.zeros(2, 2)  # a layer the model does not have
    save_file(state, weights)
    with pytest.raises(ValueError) as err:
        load_hf_checkpoint(tmp_path / "k")
    message = str(err.value)
    assert "layers.1.attn.kv_b_proj.weight" in message  # missing (Torchtune name)
    assert "layers.0.attn.q_a_proj.weight: (3, 3)" in message  # wrong shape
    assert "layers.9.attn.kv_b_proj.weight" in message  # unexpected

    state["model.layers.0.self_attn.bogus_proj.weight"] = torch.zeros(2, 2)  # no DeepseekV3 name at all
    save_file(state, weights)
    with pytest.raises(ValueError, match="unknown state-dict key 'model.layers.0.self_attn.bogus_proj.weight'"):
        load_hf_checkpoint(tmp_path / "k")


_KILLED_MID_SAVE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mla_components.checkpointing import write_hf_checkpoint
    from mla_components.models import mla
    from tests.model.conftest import small_config

    class Stall:  # pickled by torch.save inside the atomic write: announce, then hang until killed
        def __reduce__(self):
            Path(sys.argv[2]).write_text("saving")
            time.sleep(600)

    model = mla(small_config())
    write_hf_checkpoint(Path(sys.argv[1]), model.state_dict(), model.mla_config.to_hf_config(),
                        extra={"recipe_state": Stall()})
    """
)


def test_sigkill_during_save_leaves_previous_checkpoint_usable(tmp_path):
    out = tmp_path / "out"
    model = randomize_(mla(small_config()), seed=3)
    write_hf_checkpoint(
        out / "epoch_0", model.state_dict(), model.mla_config.to_hf_config(), extra={"recipe_state": {}}
    )
    before = {p.name: p.read_bytes() for p in (out / "epoch_0").iterdir()}

    marker = tmp_path / "saving"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_MID_SAVE, str(out / "epoch_0"), str(marker)], cwd=os.getcwd()
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, "the writer exited before reaching the save"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert {p.name: p.read_bytes() for p in (out / "epoch_0").iterdir()} == before  # untouched
    assert list(out.glob(".epoch_0.tmp-*")), "the killed write should have left only its temporary directory"
    assert latest_resumable_epoch(out) == out / "epoch_0"
    _, state = load_hf_checkpoint(out / "epoch_0")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    # a checkpointer writing into `out` sweeps the stale temporary directory
    base = tmp_path / "base"
    write_hf_checkpoint(base, model.state_dict(), model.mla_config.to_hf_config())
    AtomicHFCheckpointer(checkpoint_dir=str(base), output_dir=str(out))
    assert not list(out.glob(".epoch_0.tmp-*"))


def test_checkpointer_saves_epochs_resumes_newest_and_prunes(tmp_path):
    model = mla(small_config())
    base = tmp_path / "base"
    write_hf_checkpoint(base, model.state_dict(), model.mla_config.to_hf_config())
    ckpt = AtomicHFCheckpointer(checkpoint_dir=str(base), output_dir=str(tmp_path / "run"), keep_last_n_intermediate=2)
    state = ckpt.load_checkpoint()
    for epoch in range(3):
        ckpt.save_checkpoint({**state, "epochs_run": epoch + 1, "seed": 7}, epoch=epoch, intermediate_checkpoint=True)
    ckpt.save_checkpoint(state, epoch=3, intermediate_checkpoint=False)
    assert [n for n, _ in epoch_dirs(tmp_path / "run", resumable=True)] == [1, 2]  # epoch_0 pruned
    assert [n for n, _ in epoch_dirs(tmp_path / "run", resumable=False)] == [1, 2, 3]

    resumed = AtomicHFCheckpointer(
        checkpoint_dir=str(base), output_dir=str(tmp_path / "run"), should_load_recipe_state=True
    ).load_checkpoint()
    assert resumed["epochs_run"] == 3 and resumed["seed"] == 7


def test_bad_checkpointer_arguments_fail_fast_with_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        AtomicHFCheckpointer(checkpoint_dir=str(tmp_path / "nothing"), output_dir=str(tmp_path / "o"))
    model = mla(small_config())
    write_hf_checkpoint(tmp_path / "b", model.state_dict(), model.mla_config.to_hf_config())
    with pytest.raises(ValueError, match="output_dir .* must not be inside"):
        AtomicHFCheckpointer(checkpoint_dir=str(tmp_path / "b"), output_dir=str(tmp_path / "b" / "out"))
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint=True but"):
        AtomicHFCheckpointer(
            checkpoint_dir=str(tmp_path / "b"), output_dir=str(tmp_path / "o"), should_load_recipe_state=True
        )


def test_a_kill_between_the_two_renames_of_an_overwrite_is_undone(tmp_path):
    """``atomic_directory`` moves the previous epoch aside (``.epoch_N.old-*``) before renaming the new one in; a
    kill between the two leaves no ``epoch_N``. The next checkpointer on that output directory puts it back."""
    out = tmp_path / "out"
    model = randomize_(mla(small_config()), seed=4)
    for epoch in (0, 1):
        write_hf_checkpoint(
            out / f"epoch_{epoch}", model.state_dict(), model.mla_config.to_hf_config(), extra={"recipe_state": {}}
        )
    (out / "epoch_1").rename(out / ".epoch_1.old-1234abcd")  # the new epoch_1 never arrived
    (out / "epoch_0").rename(out / ".epoch_0.old-5678abcd")
    write_hf_checkpoint(out / "epoch_0", model.state_dict(), model.mla_config.to_hf_config())  # ... this one did
    assert latest_resumable_epoch(out) is None  # nothing resumable before recovery

    base = tmp_path / "base"
    write_hf_checkpoint(base, model.state_dict(), model.mla_config.to_hf_config())
    AtomicHFCheckpointer(checkpoint_dir=str(base), output_dir=str(out))
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "epoch_0", "epoch_1"]  # restored; the old copy deleted
    assert latest_resumable_epoch(out) == out / "epoch_1"
    _, state = load_hf_checkpoint(out / "epoch_1")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_flipped_bytes_are_refused_by_name_on_load_resume_and_validate(tmp_path, capsys):
    """safetensors has no checksum: a flipped bit in weight data loads silently. The manifest (sizes and SHA-256,
    written last) refuses it by file name on load, on resume and in ``mla-tune validate --checkpoint``."""
    model = randomize_(mla(small_config()))
    config = model.mla_config.to_hf_config()
    epoch = write_hf_checkpoint(tmp_path / "run" / "epoch_0", model.state_dict(), config, extra={"recipe_state": {}})
    manifest = json.loads((epoch / "checkpoint_manifest.json").read_text())["files"]
    assert set(manifest) == {p.name for p in epoch.iterdir()} - {"checkpoint_manifest.json"}
    mla_tune(["validate", "--checkpoint", str(epoch)])
    assert f"checkpoint OK: 3 files match {epoch / 'checkpoint_manifest.json'}" in capsys.readouterr().out

    weights = epoch / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x10  # inside the last tensor's data
    weights.write_bytes(bytes(data))
    load_file(weights)  # the file itself still reads
    refused = rf"refusing corrupted checkpoint file {epoch / 'model.safetensors'}: it does not match its SHA-256"
    with pytest.raises(ValueError, match=refused):
        load_hf_checkpoint(epoch)
    with pytest.raises(SystemExit, match=refused):
        mla_tune(["validate", "--checkpoint", str(epoch)])
    base = write_hf_checkpoint(tmp_path / "base", model.state_dict(), config)
    resume = AtomicHFCheckpointer(str(base), str(tmp_path / "run"), should_load_recipe_state=True)
    with pytest.raises(ValueError, match=refused):
        resume.load_checkpoint()


def test_checkpoint_files_are_world_readable_whatever_the_umask(tmp_path):
    """A serving container running as another user (uid 10001 in k8s/) must read every file."""
    model = mla(small_config())
    umask = os.umask(0o077)
    try:
        write_hf_checkpoint(tmp_path / "c", model.state_dict(), model.mla_config.to_hf_config(), extra={"x": {}})
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "c").iterdir()} == dict.fromkeys(
        ["config.json", "model.safetensors", "x.pt", "checkpoint_manifest.json"], 0o644
    )


def test_mla_weights_under_a_llama_config_are_refused_naming_config_json(tmp_path):
    model = mla(small_config())
    directory = write_hf_checkpoint(tmp_path / "c", model.state_dict(), model.mla_config.to_hf_config())
    (directory / "checkpoint_manifest.json").unlink()
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match=rf"{directory}: config.json has model_type 'llama' but the weights"):
        load_hf_checkpoint(directory)


_HOLD_OUTPUT_DIR = textwrap.dedent(
    """
    import sys, time
    from mla_components.checkpointing import AtomicHFCheckpointer

    AtomicHFCheckpointer(checkpoint_dir=sys.argv[1], output_dir=sys.argv[2])
    print("holding", flush=True)
    time.sleep(600)
    """
)


def test_one_writer_per_output_dir_and_stale_locks_are_taken_over(tmp_path):
    """While a run holds its output_dir, a second run or a resume is refused naming the holder, and touches
    nothing (not even the run's in-flight temporary directory); once the holder is gone its lock is stale."""
    model = mla(small_config())
    config = model.mla_config.to_hf_config()
    base = write_hf_checkpoint(tmp_path / "base", model.state_dict(), config)
    out = tmp_path / "run"
    write_hf_checkpoint(out / "epoch_0", model.state_dict(), config, extra={"recipe_state": {}})
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_OUTPUT_DIR, str(base), str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        (out / ".epoch_1.tmp-0123abcd").mkdir()  # the live run's save in progress
        busy = rf"output_dir {out} is in use by pid {holder.pid} on host {socket.gethostname()} .*lock file"
        for resume in (False, True):
            with pytest.raises(OutputDirLockedError, match=busy):
                AtomicHFCheckpointer(str(base), str(out), should_load_recipe_state=resume)
        assert (out / ".epoch_1.tmp-0123abcd").is_dir()
    finally:
        holder.kill()
        holder.wait()
    resumed = AtomicHFCheckpointer(str(base), str(out), should_load_recipe_state=True)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (out / ".epoch_1.tmp-0123abcd").exists()  # swept once the run is known to be gone
    assert resumed.load_checkpoint() is not None


def test_config_updates_describe_the_saved_model(tmp_path):
    """A context extension trains a model built with other RoPE settings than its checkpoint's: ``config_updates``
    put them in every saved ``config.json``, and the base checkpoint is left as it was."""
    model = mla(small_config())
    base = tmp_path / "base"
    write_hf_checkpoint(base, model.state_dict(), model.mla_config.to_hf_config())
    yarn = {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256}
    yarn |= {"mscale": 1.0, "mscale_all_dim": 1.0}
    updates = OmegaConf.create({"rope_scaling": yarn, "max_position_embeddings": 4096})  # as a YAML config passes it
    ckpt = AtomicHFCheckpointer(checkpoint_dir=str(base), output_dir=str(tmp_path / "run"), config_updates=updates)
    ckpt.save_checkpoint(ckpt.load_checkpoint(), epoch=0)
    saved = json.loads((tmp_path / "run" / "epoch_0" / "config.json").read_text())
    assert saved["rope_scaling"] == yarn and saved["max_position_embeddings"] == 4096
    assert json.loads((base / "config.json").read_text())["rope_scaling"] != yarn
    extended = mla(MLAConfig.from_hf_config(saved))
    assert extended.mla_config.rope_scaling["factor"] == 16.0 and extended.max_seq_len == 4096
    with pytest.raises(ValueError, match="checkpointer.config_updates must be a mapping"):
        AtomicHFCheckpointer(checkpoint_dir=str(base), output_dir=str(tmp_path / "o"), config_updates=["rope"])
