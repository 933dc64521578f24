"""The origin model in Torchtune computes what transformers computes on the same checkpoint (fp32): SmolLM2-135M
from the bundled GGUF, a Llama-3.2-1B-layout HF directory (llama3 RoPE scaling), and the HF directory
``write_origin`` writes, read back through the project's checkpointer."""

import json

import pytest
import torch

from mla_components.checkpointing import AtomicHFCheckpointer, read_config
from mla_components.conversion import load_origin, origin_model
from mla_components.decoding import greedy_generate
from mla_components.models import SMOLLM2_135M_CONFIG, llama_from_hf_config, smollm2_135m

REL_TOL = 1e-4
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "There is an important info hidden inside a lot of irrelevant text. The pass key is 71432. Remember it. "
    "The grass is green. The sky is blue. What is the pass key? The pass key is",
]


def rel_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs|."""
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@torch.no_grad()
def test_gguf_logits_match_transformers(gguf_reference, smollm2_model):
    reference, tokenizer = gguf_reference
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    for text in (PROMPTS[0], chat + PROMPTS[2]):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        ours, theirs = smollm2_model(ids), reference(ids).logits
        assert ours.shape == theirs.shape == (1, ids.shape[1], 49152)
        assert rel_error(ours, theirs) <= REL_TOL
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.slow  # 3 x 16 cached decoding steps on each side
@torch.no_grad()
def test_gguf_greedy_generation_matches_transformers(gguf_reference, smollm2_model):
    reference, tokenizer = gguf_reference
    for text in PROMPTS:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        theirs = reference.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=2)
        ours, _ = greedy_generate(smollm2_model, ids[0], 16)
        assert ours[0].tolist() == theirs[0].tolist(), text


def test_gguf_origin_is_the_smollm2_builder(smollm2_origin):
    config = smollm2_origin.config
    assert config["rope_scaling"] is None  # no Llama-3 frequency scaling: the checkpoint has none
    for key, value in SMOLLM2_135M_CONFIG.items():
        assert config[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
    state = smollm2_origin.state_dict
    assert all(v.dtype == torch.float32 for v in state.values())
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()  # tied, as in HF
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (3 * 64, 576)
    assert sorted(smollm2_origin.tokenizer_files) == [
        "chat_template.jinja",
        "generation_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_load_origin_defaults_to_the_bundled_gguf(monkeypatch, gguf_reference, gguf_path):
    """``load_origin()`` reads the bundled GGUF through transformers (the loaded pair is reused, not re-read)."""
    import mla_components.conversion.origin as origin_module

    seen = []
    monkeypatch.setattr(origin_module, "load_gguf_with_transformers", lambda path: seen.append(path) or gguf_reference)
    origin = load_origin()
    assert seen == [gguf_path] and origin.source == str(gguf_path)
    assert origin.config["num_hidden_layers"] == 30


@torch.no_grad()
def test_hf_directory_llama32_layout_matches_transformers(llama32_reference):
    """Llama-3.2-1B's layout (32/8 heads of 64, llama3 RoPE x32) from an HF directory, at positions where the RoPE
    scaling matters; the same weights with plain RoPE do not match (the check has teeth)."""
    directory, reference = llama32_reference
    origin = load_origin(directory)
    assert origin.config["rope_scaling"]["rope_type"] == "llama3" and origin.config["rope_theta"] == 500_000.0
    assert origin.config["max_position_embeddings"] == 131_072
    model = origin_model(origin, max_seq_len=8192)
    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(6000, 6048).expand(2, -1)
    ours = model(ids, input_pos=positions)
    theirs = reference(ids, position_ids=positions).logits
    assert rel_error(ours, theirs) <= REL_TOL
    plain = dict(origin.config, rope_scaling=None)
    with torch.device("meta"):
        unscaled = llama_from_hf_config(plain, max_seq_len=8192)
    unscaled.load_state_dict(model.state_dict(), assign=True)
    unscaled.layers[0].attn.pos_embeddings.rope_init()
    assert rel_error(unscaled(ids, input_pos=positions), theirs) > 1e-2


@torch.no_grad()
def test_written_origin_reloads_through_the_checkpointer(smollm2_dir, smollm2_model, gguf_reference, tmp_path):
    """``write_origin``'s directory: AtomicHFCheckpointer -> smollm2_135m() with no missing/unexpected keys and
    the same logits; transformers reads it back to the GGUF model's logits."""
    config = read_config(smollm2_dir)
    assert config["model_type"] == "llama" and config["torch_dtype"] == "float32"
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    checkpointer = AtomicHFCheckpointer(checkpoint_dir=str(smollm2_dir), output_dir=str(tmp_path / "out"))
    state = checkpointer.load_checkpoint()["model"]
    with torch.device("meta"):  # as Torchtune's recipes build it: on meta, then the checkpoint assigned
        model = smollm2_135m()
    keys = model.load_state_dict(state, strict=True, assign=True)
    assert not keys.missing_keys and not keys.unexpected_keys
    model.layers[0].attn.pos_embeddings.rope_init()  # the one RoPE module all layers share
    model.eval()
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314, 2]])
    assert torch.equal(model(ids), smollm2_model(ids))

    from transformers import LlamaForCausalLM

    reread = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert torch.equal(reread(ids).logits, gguf_reference[0](ids).logits)
