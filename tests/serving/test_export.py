"""`python -m mla_components.export`: a valid, servable directory from a training checkpoint; bad input refused
before any weight is read, naming the field (or the keys) and the fix."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mla_components.checkpointing import load_hf_checkpoint, read_config, write_hf_checkpoint
from mla_components.export import (
    EXPORT_MARKER,
    ExportError,
    export_checkpoint,
    load_exported_checkpoint,
    serving_config_problems,
)


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    """The init CLI's mla_tiny checkpoint (N(0, 0.02) weights, as training starts from)."""
    out = tmp_path_factory.mktemp("export") / "init"
    subprocess.run(
        [sys.executable, "-m", "mla_components.checkpointing.init", "--model", "mla_tiny", "--output", str(out)],
        check=True,
        timeout=300,
    )
    return out


@pytest.fixture(scope="module")
def epoch_dir(init_dir, tmp_path_factory):
    """An intermediate training epoch as AtomicHFCheckpointer writes it: weights + recipe_state.pt."""
    config, state = load_hf_checkpoint(init_dir)
    out = tmp_path_factory.mktemp("train") / "epoch_0"
    return write_hf_checkpoint(out, state, config, side_files_from=init_dir, extra={"recipe_state": {"epochs_run": 1}})


def _copy(src, dst, *, config=None, drop=(), rename=None):
    """A copy of checkpoint ``src`` with config.json fields changed, files dropped or a weight key renamed (edited
    by hand: without the manifest, which would refuse the edit)."""
    dst.mkdir()
    for path in src.iterdir():
        if path.name not in drop and not (path.name == "checkpoint_manifest.json" and (config or rename)):
            dst.joinpath(path.name).write_bytes(path.read_bytes())
    if config:
        (dst / "config.json").write_text(json.dumps({**read_config(src), **config}))
    if rename:
        weights = load_file(dst / "model.safetensors")
        old, new = rename
        weights[new] = weights.pop(old)
        save_file(weights, dst / "model.safetensors")
    return dst


def test_export_of_a_training_epoch_is_servable(epoch_dir, tmp_path):
    out = export_checkpoint(epoch_dir, tmp_path / "out")  # default bf16
    names = sorted(p.name for p in out.iterdir())
    assert "recipe_state.pt" in {p.name for p in epoch_dir.iterdir()} and "recipe_state.pt" not in names
    for required in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert required in names
    config = read_config(out)
    assert serving_config_problems(config) == []
    assert config["torch_dtype"] == "bfloat16"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["do_sample"] is False and generation["bos_token_id"] == config["bos_token_id"]
    _, ours = load_hf_checkpoint(epoch_dir)
    _, exported = load_hf_checkpoint(out)
    for key, value in ours.items():
        assert exported[key].dtype == torch.bfloat16 and torch.equal(exported[key], value.to(torch.bfloat16)), key


def test_cli_exports_and_reports_bad_input(epoch_dir, tmp_path):
    cli = [sys.executable, "-m", "mla_components.export", "--checkpoint"]
    ok = subprocess.run([*cli, str(epoch_dir), "--output", str(tmp_path / "out"), "--dtype", "float32"],
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ok.returncode == 0 and "wrote" in ok.stdout, ok.stderr
    assert read_config(tmp_path / "out")["torch_dtype"] == "float32"
    bad = subprocess.run([*cli, str(epoch_dir.parent), "--output", str(tmp_path / "o2")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and f"--checkpoint {epoch_dir}" in bad.stderr  # points at the epoch to use
    assert not (tmp_path / "o2").exists()


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_refuses_outputs_it_did_not_write_in_one_line_and_deletes_nothing(init_dir, tmp_path):
    """An unrelated directory, an existing file, the parent of the source checkpoint (with the run's logs), the
    working directory as ``.`` and as its absolute path: each refused with exit code 2, one line naming the path
    and the fix, no traceback, and every file where it was."""
    run = tmp_path / "run"
    run.mkdir()
    _copy(init_dir, run / "epoch_0")
    (run / "logs").mkdir()
    (run / "logs" / "log_1.txt").write_text("Step 1 | loss:1.0\n")
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    (tmp_path / "a_file").write_text("mine")
    before = _files(tmp_path)
    cases = [
        ("unrelated", tmp_path, "is not empty and holds no previous export"),
        ("a_file", tmp_path, "exists and is not a directory"),
        ("run", tmp_path, "contains --checkpoint"),
        ("run/epoch_0/export", tmp_path, "is inside --checkpoint"),
        (".", unrelated, "is the working directory or above it"),
        (str(unrelated), unrelated, "is the working directory or above it"),
    ]
    for output, cwd, message in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "mla_components.export", "--checkpoint", str(run / "epoch_0"), "--output", output],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=300,
        )
        ours = [line for line in proc.stderr.splitlines() if line.startswith("export failed:")]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(ours) == 1 and f"--output {output} " in ours[0] and message in ours[0], proc.stderr
        assert _files(tmp_path) == before, output
        assert not [p for p in tmp_path.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def test_previous_export_is_replaced_only_with_overwrite_and_atomically(init_dir, tmp_path, monkeypatch):
    out = export_checkpoint(init_dir, tmp_path / "out", dtype="float32")
    assert json.loads((out / EXPORT_MARKER).read_text())["dtype"] == "float32"
    with pytest.raises(ExportError, match=f"--output {out} holds a previous export: add --overwrite"):
        export_checkpoint(init_dir, out)
    exported = _files(out)

    import mla_components.checkpointing._hf_format as hf_format

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(hf_format, "save_file", full_disk)
        with pytest.raises(OSError, match="No space left"):
            export_checkpoint(init_dir, out, overwrite=True)
    assert _files(out) == exported  # a failed overwrite keeps the previous export
    assert export_checkpoint(init_dir, out, overwrite=True) == out
    assert read_config(out)["torch_dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left aside

    (tmp_path / "empty").mkdir()
    export_checkpoint(init_dir, tmp_path / "empty", dtype="float32")  # an empty directory is fine
    save_file = hf_format.save_file

    def user_adds_a_file(*args, **kwargs):  # while the export is being written
        (tmp_path / "late").mkdir(exist_ok=True)
        (tmp_path / "late" / "notes.txt").write_text("mine")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(hf_format, "save_file", user_adds_a_file)
    with pytest.raises(ExportError, match="is not empty and holds no previous export"):
        export_checkpoint(init_dir, tmp_path / "late", dtype="float32")
    assert _files(tmp_path / "late") == {Path("notes.txt"): b"mine"}


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"first_k_dense_replace": 1}, "first_k_dense_replace is 1: must equal num_hidden_layers"),
        ({"n_routed_experts": None}, "n_routed_experts is None: must be an integer"),
        ({"rope_interleave": False}, "rope_interleave is False: must be true"),
        ({"rope_scaling": None}, "rope_scaling is None: must be a YaRN dict"),
        ({"kv_lora_rank": 256}, r"kv_lora_rank \+ qk_rope_head_dim is 256 \+ 64: vLLM's MLA kernels need 512 \+ 64"),
        ({"model_type": "llama"}, "model_type is 'llama': export serves MLA checkpoints only"),
    ],
)
def test_unservable_config_is_refused_naming_the_field(init_dir, tmp_path, fields, message):
    src = _copy(init_dir, tmp_path / "src", config=fields)
    with pytest.raises(ExportError, match=message):
        export_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_that_dont_match_the_builder_are_refused_naming_the_keys(init_dir, tmp_path):
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    src = _copy(init_dir, tmp_path / "src", rename=(key, "model.layers.0.self_attn.kv_b.weight"))
    with pytest.raises(ValueError, match=r"unknown state-dict key 'model\.layers\.0\.self_attn\.kv_b\.weight'"):
        export_checkpoint(src, tmp_path / "out")
    shapes = _copy(init_dir, tmp_path / "shapes", config={"intermediate_size": 512, "moe_intermediate_size": 512})
    with pytest.raises(ValueError, match=r"wrong shapes \['layers\.0\.mlp\.w1\.weight: \(768, 256\) != \(512, 256\)"):
        export_checkpoint(shapes, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupted_safetensors_is_refused(init_dir, tmp_path):
    src = _copy(init_dir, tmp_path / "src")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with pytest.raises(ValueError, match="refusing corrupted checkpoint file .*model.safetensors"):  # manifest
        export_checkpoint(src, tmp_path / "out")
    (src / "checkpoint_manifest.json").unlink()
    with pytest.raises(ValueError, match="refusing corrupted safetensors file .*model.safetensors"):
        export_checkpoint(src, tmp_path / "out")


def test_missing_tokenizer_and_bad_options_are_refused(init_dir, tmp_path):
    src = _copy(init_dir, tmp_path / "src", drop=("tokenizer.json",))
    with pytest.raises(ExportError, match="none of the tokenizer files"):
        export_checkpoint(src, tmp_path / "out")
    with pytest.raises(ExportError, match="quantize must be one of"):
        export_checkpoint(init_dir, tmp_path / "out", quantize="int4")
    with pytest.raises(ExportError, match="dtype must be one of"):
        export_checkpoint(init_dir, tmp_path / "out", dtype="int8")
    with pytest.raises(ExportError, match="must differ from --checkpoint"):
        export_checkpoint(init_dir, init_dir)


# Per output row, relative to the row's max |w|: half a quantisation step (int8: 1/254; fp8 e4m3, 3 mantissa bits:
# 1/16) plus bf16 rounding (unit roundoff 2**-8) of the scale and of the dequantised value.
@pytest.mark.parametrize(
    "quantize, bound", [("int8_weight_only", 1 / 254 + 2**-7), ("float8_weight_only", 1 / 16 + 2**-7)]
)
def test_quantised_export_is_torchao_and_close_per_row(init_dir, tmp_path, quantize, bound):
    """Quantised bf16 exports stay within that bound: so torchao's int8 scale floor at bf16 eps (2**-7, which
    would zero most of these N(0, 0.02) weights, an error of ~12%) is avoided."""
    out = export_checkpoint(init_dir, tmp_path / "q", dtype="bfloat16", quantize=quantize)
    config = read_config(out)
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert "lm_head" in config["quantization_config"]["modules_to_not_convert"]
    stored = load_file(out / "model.safetensors")
    assert stored["model.layers.0.mlp.up_proj._weight_qdata"].element_size() == 1  # 1 byte per weight
    assert (out / "model.safetensors").stat().st_size < 0.6 * (init_dir / "model.safetensors").stat().st_size / 2
    _, original = load_hf_checkpoint(init_dir)
    _, dequantised = load_exported_checkpoint(out)
    assert set(dequantised) == set(original)
    for key, weight in original.items():
        if key.endswith("proj.weight") or ".mlp.w" in key or key.endswith("output_proj.weight"):
            row_max = weight.abs().amax(dim=1)
            error = (dequantised[key].float() - weight).abs().amax(dim=1)
            assert (error <= bound * row_max + 1e-6).all(), key
        else:  # embeddings, lm_head and norms are only cast
            assert torch.equal(dequantised[key], weight.to(torch.bfloat16)), key


def test_passkey_eval_runs_the_int8_export_beside_the_float_one(init_dir, tmp_path):
    """The quantisation's quality cost on the passkey eval: the checkpointer loads a quantised export dequantised
    (the function a weight-only quantised matmul computes), so compare mode puts it beside the unquantised export."""
    from mla_components.checkpointing import AtomicHFCheckpointer
    from mla_components.evaluation.passkey import evaluate_checkpoints

    exports = {
        "fp32": export_checkpoint(init_dir, tmp_path / "fp32", dtype="float32"),
        "int8": export_checkpoint(init_dir, tmp_path / "int8", dtype="float32", quantize="int8_weight_only"),
    }
    loaded = AtomicHFCheckpointer(str(exports["int8"]), str(tmp_path / "unused")).load_checkpoint()["model"]
    _, dequantised = load_exported_checkpoint(exports["int8"])
    _, original = load_hf_checkpoint(init_dir)
    assert all(torch.equal(loaded[k], dequantised[k]) for k in original)
    assert not torch.equal(loaded["layers.0.mlp.w1.weight"], original["layers.0.mlp.w1.weight"])  # int8 values

    grid = dict(context_lengths=[400], depths=[0.5], trials_per_cell=2, progress=False)
    paths = evaluate_checkpoints(exports, tmp_path / "eval", **grid)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["fp32", "int8"]
    assert [m["checkpoint"] for m in results["models"]] == [str(exports["fp32"]), str(exports["int8"])]
    assert "int8" in paths["summary"].read_text()


def test_tied_embeddings_are_written_as_lm_head(init_dir, tmp_path):
    config, state = load_hf_checkpoint(init_dir)
    state["tok_embeddings.weight"] = state.pop("output.weight")
    tied = write_hf_checkpoint(tmp_path / "tied", state, {**config, "tie_word_embeddings": True})
    assert "lm_head.weight" not in load_file(tied / "model.safetensors")
    (tied / "tokenizer.json").write_bytes((init_dir / "tokenizer.json").read_bytes())
    out = export_checkpoint(tied, tmp_path / "out", dtype="float32")
    weights = load_file(out / "model.safetensors")
    assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    assert read_config(out)["tie_word_embeddings"] is True
    _, reloaded = load_hf_checkpoint(out)  # our loader drops the duplicate again
    assert "output.weight" not in reloaded


def _narrow_latent(src: Path, dst: Path, rank: int) -> Path:
    """``src`` (mla_tiny, latent 512) cut to a ``rank``-wide latent: a valid MLA model vLLM's kernels cannot serve."""
    config, state = load_hf_checkpoint(src)
    for name, weight in list(state.items()):
        if name.endswith(".attn.kv_a_proj.weight"):
            state[name] = torch.cat([weight[:rank], weight[config["kv_lora_rank"] :]])
        elif name.endswith(".attn.kv_b_proj.weight"):
            state[name] = weight[:, :rank].contiguous()
        elif name.endswith(".attn.kv_a_norm.scale"):
            state[name] = (weight[:rank] * (1 + torch.rand(rank))).contiguous()  # a norm weight that is not all ones
    return write_hf_checkpoint(dst, state, {**config, "kv_lora_rank": rank}, side_files_from=src)


def test_a_narrower_latent_is_served_padded_with_zeros_and_computes_the_same_logits(init_dir, tmp_path):
    """A 128 + 64 model is refused as it is (the error names --pad-latent) and exported at 512 + 64 with zeros;
    transformers' DeepseekV3 gives the padded export the logits of the unpadded model (the only change: the latent
    RMSNorm's epsilon acts 4x larger)."""
    from transformers import AutoModelForCausalLM

    src = _narrow_latent(init_dir, tmp_path / "narrow", 128)
    with pytest.raises(ExportError, match="--pad-latent 512"):
        export_checkpoint(src, tmp_path / "refused")
    with pytest.raises(ExportError, match=r"--pad-latent 64 must be an integer >= the checkpoint's kv_lora_rank 128"):
        export_checkpoint(src, tmp_path / "refused", pad_latent_to=64)
    assert not (tmp_path / "refused").exists()

    out = export_checkpoint(src, tmp_path / "padded", dtype="float32", pad_latent_to=512)
    assert read_config(out)["kv_lora_rank"] == 512 and serving_config_problems(read_config(out)) == []
    _, padded = load_hf_checkpoint(out)
    assert padded["layers.0.attn.kv_b_proj.weight"].shape[1] == 512
    assert not padded["layers.0.attn.kv_b_proj.weight"][:, 128:].any()
    assert not padded["layers.0.attn.kv_a_proj.weight"][128:512].any()

    prompt = torch.randint(0, read_config(src)["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(0))
    logits = []
    for directory in (src, out):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            logits.append(model(prompt).logits)
    narrow_logits, padded_logits = logits
    scale = narrow_logits.abs().max()
    assert (padded_logits - narrow_logits).abs().max() <= 1e-4 * scale
    assert not torch.allclose(padded_logits, narrow_logits.roll(1, dims=-1))  # the logits are not degenerate

    # the CLI takes the same option
    proc = subprocess.run(
        [sys.executable, "-m", "mla_components.export", "--checkpoint", str(src), "--output", str(tmp_path / "cli"),
         "--pad-latent", "512", "--dtype", "float32"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert read_config(tmp_path / "cli")["kv_lora_rank"] == 512
