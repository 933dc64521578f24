"""Compact deltas (``mla_components.checkpointing.delta``): a tuned checkpoint as low-rank int8 factors over a base
that is rebuilt elsewhere, within a size budget, refused over any other base."""

import json

import pytest
import torch

from mla_components.checkpointing import load_hf_checkpoint
from mla_components.checkpointing._hf_format import read_config, read_safetensors, write_hf_directory
from mla_components.checkpointing.delta import (
    apply_delta,
    check_base,
    compress_change,
    decompose_change,
    extract_delta,
    fingerprint_state,
    load_delta,
    main,
    save_delta,
)
from mla_components.checkpointing.init import write_initial_checkpoint
from mla_components.models import mla_tiny


def low_rank_change(base, rank, scale, seed=0):
    """``base`` plus a rank-``rank`` change of every matrix and a small change of every vector."""
    gen = torch.Generator().manual_seed(seed)
    tuned = {}
    for name, weight in base.items():
        if weight.ndim == 2:
            m, n = weight.shape
            change = torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen) * scale / rank**0.5
        else:
            change = torch.randn(weight.shape, generator=gen) * scale
        tuned[name] = weight + change
    return tuned


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_initial_checkpoint("mla_tiny", tmp_path_factory.mktemp("delta") / "base", seed=3)


def relative_error(got, want):
    num = sum(float((got[k] - want[k]).double().pow(2).sum()) for k in want)
    den = sum(float(want[k].double().pow(2).sum()) for k in want)
    return (num / den) ** 0.5


def test_a_low_rank_change_within_budget_is_rebuilt_to_the_precision_of_its_factors(base_dir):
    base = read_safetensors(base_dir)
    tuned = low_rank_change(base, rank=4, scale=0.01)
    change = {k: tuned[k] - base[k] for k in base}
    for bits, tolerance in ((16, 1e-2), (8, 2e-2)):
        tensors, report = extract_delta(base, tuned, 4 * 2**20, bits=bits)
        rebuilt = apply_delta(base, tensors)
        got = {k: rebuilt[k] - base[k] for k in base}
        assert relative_error(got, change) < tolerance, bits
        ranks = {v["rank"] for v in report["tensors"].values() if v["rank"] != "full"}
        assert ranks == {4}  # a rank-4 change needs no more; the budget left over buys nothing
        assert report["kept_energy"] > 1 - tolerance**2 * 4
        assert report["tensor_bytes"] <= 4 * 2**20


def test_rounding_to_the_tuned_dtype_is_no_change(base_dir):
    """A bf16 checkpoint of an fp32 base that training never touched differs from it only by rounding: an empty
    delta, and applying it gives the bf16 weights exactly. A bf16 fine-tune's change is taken the same way."""
    base = read_safetensors(base_dir)
    rounded = {k: v.to(torch.bfloat16) for k, v in base.items()}
    tensors, report = extract_delta(base, rounded, 2**20)
    assert tensors == {} and report["changed_tensors"] == 0 and report["kept_energy"] == 1.0
    rebuilt = apply_delta(base, tensors, torch.bfloat16)
    assert all(torch.equal(rebuilt[k].to(torch.bfloat16), rounded[k]) for k in base)
    tuned = {k: v.to(torch.bfloat16) for k, v in low_rank_change(base, 2, 0.01).items()}
    tensors, report = extract_delta(base, tuned, 2**20)
    rebuilt = apply_delta(base, tensors, torch.bfloat16)
    change = {k: tuned[k].float() - rounded[k].float() for k in base}
    assert relative_error({k: rebuilt[k] - rounded[k].float() for k in base}, change) < 2e-2


def test_the_budget_goes_to_the_ranks_that_remove_most_error_per_byte(base_dir):
    """A budget too small for the whole change: it is spent (nearly) to the byte, never exceeded, and the matrix
    whose change is ten times larger gets more of its ranks than an equally shaped one."""
    base = read_safetensors(base_dir)
    tuned = low_rank_change(base, rank=16, scale=0.01)
    loud, quiet = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
    tuned[loud] = base[loud] + (tuned[loud] - base[loud]) * 10
    full, _ = extract_delta(base, tuned, 64 * 2**20)
    budget = sum(t.numel() * t.element_size() for t in full.values()) // 3
    tensors, report = extract_delta(base, tuned, budget)
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    one_rank = max((sum(base[k].shape) + 8) for k in base if base[k].ndim == 2)
    assert budget - one_rank <= stored <= budget
    assert report["tensors"][loud]["rank"] == 16 and report["tensors"][quiet]["rank"] < 16
    assert report["tensors"][loud]["error"] < report["tensors"][quiet]["error"]
    assert 0.3 < report["kept_energy"] < 1.0


def test_a_delta_is_refused_over_another_base_naming_the_tensor(base_dir, tmp_path):
    """Flipping the sign of one latent dimension (a row of kv_a and the matching column of kv_b) leaves the model's
    function unchanged but not the weights the delta was made against: refused. Float noise of a rebuilt base
    (1e-7 relative) is accepted."""
    base = read_safetensors(base_dir)
    tensors, report = extract_delta(base, low_rank_change(base, 2, 0.01), 2**20)
    fingerprint = fingerprint_state(base)
    path = save_delta(tmp_path / "d.safetensors", tensors, fingerprint, read_config(base_dir), "rebuild me", report)
    _, metadata = load_delta(path)
    noisy = {
        k: v * (1 + 1e-7 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))) for k, v in base.items()
    }
    check_base(noisy, metadata["base_fingerprint"])
    flipped = dict(base)
    kv_a, kv_b = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.self_attn.kv_b_proj.weight"
    flipped[kv_a], flipped[kv_b] = base[kv_a].clone(), base[kv_b].clone()
    flipped[kv_a][5] *= -1
    flipped[kv_b][:, 5] *= -1
    with pytest.raises(
        ValueError, match=r"base tensor model\.layers\.1\.self_attn\.kv_a_proj_with_mqa\.weight differs"
    ):
        check_base(flipped, metadata["base_fingerprint"])
    del flipped[kv_a]
    with pytest.raises(ValueError, match="missing"):
        check_base(flipped, metadata["base_fingerprint"])


def test_cli_extract_apply_inspect_round_trip(base_dir, tmp_path, capsys):
    """A tuned HF directory (new config: YaRN) -> delta file under --max-mb -> rebuilt directory that loads as an
    MLA checkpoint with the tuned config and computes the tuned model's logits."""
    config = read_config(base_dir)
    base = read_safetensors(base_dir)
    tuned_config = config | {
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
        "torch_dtype": "float32",
    }
    tuned = low_rank_change(base, rank=3, scale=0.005, seed=5)  # a quarter of the weights (init std 0.02)
    write_hf_directory(tmp_path / "tuned", tuned, tuned_config, side_files_from=base_dir)
    delta = tmp_path / "delta.safetensors"
    recipe = "write_initial_checkpoint('mla_tiny', seed=3)"
    args = ["extract", "--base", str(base_dir), "--tuned", str(tmp_path / "tuned"), "--output", str(delta)]
    assert main([*args, "--max-mb", "1", "--base-recipe", recipe]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["file_bytes"] == delta.stat().st_size <= 1_000_000  # --max-mb caps the whole file
    tight = tmp_path / "tight.safetensors"  # a cap below the whole change: fewer ranks, the file still under it
    assert main([*args[:-1], str(tight), "--max-mb", "0.08", "--base-recipe", recipe]) == 0
    tight_summary = json.loads(capsys.readouterr().out)
    assert tight.stat().st_size <= 80_000 and tight_summary["kept_energy"] < summary["kept_energy"]
    assert main(["apply", "--base", str(base_dir), "--delta", str(delta), "--output", str(tmp_path / "rebuilt")]) == 0
    assert main(["inspect", str(delta)]) == 0
    assert recipe in capsys.readouterr().out

    rebuilt_config, rebuilt_state = load_hf_checkpoint(tmp_path / "rebuilt")
    _, tuned_state = load_hf_checkpoint(tmp_path / "tuned")
    assert rebuilt_config["rope_scaling"] == tuned_config["rope_scaling"]
    assert (tmp_path / "rebuilt" / "tokenizer.json").is_file()
    tokens = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, state in (("rebuilt", rebuilt_state), ("tuned", tuned_state), ("base", load_hf_checkpoint(base_dir)[1])):
        model = mla_tiny().eval()
        model.load_state_dict(state)
        with torch.no_grad():
            logits[name] = model(tokens).double()
    # what the fine-tune did to the logits, and what of it the int8 factors lose
    effect = (logits["tuned"] - logits["base"]).norm()
    assert (logits["rebuilt"] - logits["tuned"]).norm() < 0.05 * effect, summary


def test_bad_arguments_are_named(base_dir, tmp_path):
    base = read_safetensors(base_dir)
    with pytest.raises(ValueError, match="bits must be 8 or 16"):
        extract_delta(base, base, 2**20, bits=4)
    other = dict(base)
    other.pop("model.norm.weight")
    with pytest.raises(ValueError, match=r"only in base \['model\.norm\.weight'\]"):
        extract_delta(base, other, 2**20)
    with pytest.raises(ValueError, match="vectors and small matrices alone take"):
        extract_delta(base, low_rank_change(base, 1, 0.01), 100)
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_delta(tmp_path / "missing.safetensors")
    with pytest.raises(SystemExit):
        main(["extract", "--base", "a", "--tuned", "b", "--output", "c", "--max-mb", "0", "--base-recipe", "r"])


def test_cli_refuses_a_device_it_cannot_use_before_reading_checkpoints(tmp_path, capsys):
    device = "cuda" if not torch.cuda.is_available() else "nope"
    missing = tmp_path / "never-read"
    args = ["extract", "--base", str(missing), "--tuned", str(missing), "--output", str(tmp_path / "d.safetensors")]
    with pytest.raises(SystemExit):
        main([*args, "--base-recipe", "r", "--device", device])
    assert f"--device {device} cannot be used here" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_svds_on_the_gpu_store_the_same_change(base_dir):
    base = read_safetensors(base_dir)
    tuned = low_rank_change(base, 3, 0.02, seed=5)
    stored = {}
    for device in ("cpu", "cuda"):
        tensors, _ = compress_change(decompose_change(base, tuned, device), 2**20)
        stored[device] = apply_delta(base, tensors, torch.float32)
    assert relative_error(stored["cuda"], stored["cpu"]) < 1e-3
