"""MasterWeightAdamW: torch.optim.AdamW's trajectory on fp32 parameters, and updates that survive on bf16 ones."""

import pytest
import torch

from mla_components.optim import MasterWeightAdamW


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=gen).to(next(model.parameters()).dtype)
        loss = (model(x).float() - 1.0).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dtype)


def test_fp32_parameters_follow_torch_adamw():
    ours, ref = _model(torch.float32), _model(torch.float32)
    kwargs = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1)
    _train(ours, MasterWeightAdamW(ours.parameters(), **kwargs), steps=20)
    _train(ref, torch.optim.AdamW(ref.parameters(), **kwargs), steps=20)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_small_updates_of_bf16_parameters_accumulate_in_the_master_weights():
    """The same gradients for one weight kept three ways: at lr 1e-5 every update is below half a bf16 step of
    weights ~0.1, so torch's AdamW on the bf16 weight leaves most of it unchanged, while the master weights follow
    the fp32 trajectory and the bf16 weight is their rounding."""
    lr, steps = 1e-5, 30
    gen = torch.Generator().manual_seed(0)
    start = torch.rand(64, 64, generator=gen) * 0.1 + 0.05
    drift = torch.randn(64, 64, generator=gen)
    grads = [drift + 0.5 * torch.randn(64, 64, generator=gen) for _ in range(steps)]
    fp32 = torch.nn.Parameter(start.clone())
    plain = torch.nn.Parameter(start.bfloat16())
    kept = torch.nn.Parameter(start.bfloat16())
    optimizers = [
        torch.optim.AdamW([fp32], lr=lr, weight_decay=0.0),
        torch.optim.AdamW([plain], lr=lr, weight_decay=0.0),
        MasterWeightAdamW([kept], lr=lr, weight_decay=0.0),
    ]
    for grad in grads:
        for param, optimizer in zip((fp32, plain, kept), optimizers, strict=True):
            param.grad = grad.to(param.dtype)
            optimizer.step()
    master = optimizers[2].state[kept]["master"]
    assert (plain == start.bfloat16()).float().mean() > 0.5  # bf16 rounding swallowed most updates
    assert (fp32 - start).abs().mean() > 10 * lr
    moved = master - start.bfloat16().float()  # the master starts from the bf16 weight
    torch.testing.assert_close(moved, (fp32 - start).detach(), rtol=0, atol=1e-6)
    assert torch.equal(kept.detach(), master.bfloat16())


def test_state_dict_round_trip_resumes_exactly():
    a, b = _model(torch.bfloat16), _model(torch.bfloat16)
    opt_a = MasterWeightAdamW(a.parameters(), lr=1e-3)
    _train(a, opt_a, steps=5)
    b.load_state_dict(a.state_dict())
    opt_b = MasterWeightAdamW(b.parameters(), lr=1e-3)
    opt_b.load_state_dict(opt_a.state_dict())
    _train(a, opt_a, steps=5, seed=1)
    _train(b, opt_b, steps=5, seed=1)
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y)
        assert torch.equal(opt_a.state[x]["master"], opt_b.state[y]["master"])
        assert opt_b.state[y]["master"].dtype == opt_b.state[y]["exp_avg"].dtype == torch.float32


def test_bad_hyperparameters_name_the_field():
    params = _model(torch.float32).parameters()
    with pytest.raises(ValueError, match="optimizer.lr"):
        MasterWeightAdamW(params, lr=-1.0)
    with pytest.raises(ValueError, match="optimizer.betas"):
        MasterWeightAdamW(_model(torch.float32).parameters(), betas=(1.0, 0.9))
