"""Builders: validation at construction, meta-device builds, and Torchtune's training utilities unchanged."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchtune import training
from torchtune.modules import TransformerSelfAttentionLayer

from mla_components.models import MLAConfig, mla, mla_tiny
from mla_components.modules import DecoupledRotaryEmbedding, mla_softmax_scale

from .conftest import YARN, randomize_, small_config


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"kv_lora_rank": 0}, "kv_lora_rank"),
        ({"q_lora_rank": -4}, "q_lora_rank"),
        ({"num_heads": 0}, "num_heads"),
        ({"v_head_dim": -1}, "v_head_dim"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "original_max_position_embeddings"),
        ({"rope_scaling": {"original_max_position_embeddings": 64}}, "factor"),
        ({"rope_scaling": {**YARN, "beta_fast": 0.5}}, "beta_fast"),
        ({"rope_scaling": {**YARN, "scale": 2}}, "unknown keys"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type"),
        ({"kernel_backend": "cuda"}, "kernel_backend"),
    ],
)
def test_invalid_dimensions_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        small_config(**overrides)


def test_builder_overrides_are_validated_too():
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        mla_tiny(qk_rope_head_dim=63)
    with pytest.raises(ValueError, match="unknown MLA builder argument"):
        mla_tiny(kv_rank=4)


def test_projection_shapes_that_do_not_match_heads_raise():
    from mla_components.models import mla_attention

    rope = DecoupledRotaryEmbedding(8, 64)
    attn = mla_attention(small_config(), rope)
    attn.kv_b_proj = torch.nn.Linear(40, 3 * 21, bias=False)  # one column short per head
    with pytest.raises(ValueError, match=r"kv_b_proj.out_features is 63 .* require 66"):
        type(attn)(
            embed_dim=48,
            num_heads=3,
            qk_nope_head_dim=12,
            qk_rope_head_dim=8,
            v_head_dim=10,
            kv_lora_rank=40,
            kv_a_proj=attn.kv_a_proj,
            kv_a_norm=attn.kv_a_norm,
            kv_b_proj=attn.kv_b_proj,
            output_proj=attn.output_proj,
            pos_embeddings=rope,
            softmax_scale=1.0,
            q_a_proj=attn.q_a_proj,
            q_a_norm=attn.q_a_norm,
            q_b_proj=attn.q_b_proj,
        )


def test_softmax_scale_follows_hf_mscale_all_dim():
    # DeepSeek-V3: factor 40, mscale_all_dim 1 -> (0.1 ln 40 + 1)^2 = 1.8739 times 192**-0.5
    v3 = {"factor": 40, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert mla_softmax_scale(192, v3) == pytest.approx(0.13523, abs=1e-5)
    assert mla_softmax_scale(192, None) == pytest.approx(192**-0.5)


def test_meta_device_build_plus_rope_init_equals_eager_build():
    config = small_config(rope_scaling=YARN)
    eager = randomize_(mla(config)).eval()
    with torch.device("meta"):
        meta = mla(config)
    meta.to_empty(device="cpu")
    meta.load_state_dict(eager.state_dict())
    for module in meta.modules():
        if hasattr(module, "rope_init"):
            module.rope_init()
    meta.eval()
    rope_e, rope_m = eager.layers[0].attn.pos_embeddings, meta.layers[0].attn.pos_embeddings
    assert torch.equal(rope_e.cache, rope_m.cache) and torch.equal(rope_e.theta, rope_m.theta)
    tokens = torch.randint(0, 97, (2, 70))
    with torch.no_grad():
        assert torch.equal(meta(tokens), eager(tokens))


def test_activation_checkpointing_keeps_loss_and_gradients():
    config = small_config(rope_scaling=YARN)
    plain = randomize_(mla(config))
    checkpointed = randomize_(mla(config))
    training.set_activation_checkpointing(checkpointed, auto_wrap_policy={TransformerSelfAttentionLayer})
    tokens = torch.randint(0, 97, (2, 33))
    losses = []
    for model in (plain, checkpointed):
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    wrapped = {n.replace("_checkpoint_wrapped_module.", ""): p for n, p in checkpointed.named_parameters()}
    assert any("_checkpoint_wrapped_module" in n for n, _ in checkpointed.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(p.grad, wrapped[name].grad, rtol=1e-5, atol=1e-6)


def test_torch_compile_matches_eager():
    model = randomize_(mla(small_config())).eval()
    tokens = torch.randint(0, 97, (1, 16))
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def _fsdp_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = randomize_(mla(small_config(rope_scaling=YARN)))
        reference = randomize_(mla(small_config(rope_scaling=YARN)))
        training.shard_model(
            model,
            [lambda name, module: isinstance(module, TransformerSelfAttentionLayer)],
            cpu_offload=False,
            reshard_after_forward=True,
        )
        tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(rank))
        loss = model(tokens).float().pow(2).mean()
        loss.backward()
        ref_loss = reference(tokens).float().pow(2).mean()
        torch.save(
            {"loss": loss.item(), "ref": ref_loss.item(), "sharded": type(model).__name__},
            f"{result_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharding_with_torchtune_shard_model(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["sharded"].startswith("FSDP")
        assert result["loss"] == pytest.approx(result["ref"], rel=1e-5)


def test_config_is_attached_for_export():
    assert isinstance(mla_tiny().mla_config, MLAConfig)
