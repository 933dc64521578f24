"""DPOWithChosenNLL: Torchtune's DPOLoss plus an NLL anchor on the chosen answer."""

import math

import pytest
import torch
from torchtune.rlhf.loss import DPOLoss

from mla_components.losses import DPOWithChosenNLL


def _logps(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [-torch.rand(6, generator=gen, dtype=torch.float64) * 20 for _ in range(4)]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_weight_zero_is_torchtunes_dpo_loss(label_smoothing):
    inputs = _logps()
    ours = DPOWithChosenNLL(beta=0.2, label_smoothing=label_smoothing, nll_weight=0.0)(*inputs)
    ref = DPOLoss(beta=0.2, label_smoothing=label_smoothing)(*inputs)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_adds_the_weighted_chosen_nll_and_keeps_dpos_rewards(label_smoothing):
    inputs = _logps(1)
    ours = DPOWithChosenNLL(beta=0.1, label_smoothing=label_smoothing, nll_weight=0.3)
    losses, chosen_rewards, rejected_rewards = ours(*inputs)
    ref_losses, ref_chosen, ref_rejected = DPOLoss(beta=0.1, label_smoothing=label_smoothing)(*inputs)
    torch.testing.assert_close(losses, ref_losses + 0.3 * -inputs[0])
    torch.testing.assert_close(chosen_rewards, ref_chosen)
    torch.testing.assert_close(rejected_rewards, ref_rejected)


def test_the_chosen_answer_is_still_pulled_up_once_dpo_saturates():
    # a margin of 100 nats at beta 0.1: DPO's gradient is beta * sigmoid(-10) ~ 4.5e-6, the anchor's stays nll_weight
    chosen = torch.tensor([-8.0], requires_grad=True)
    rejected, ref_chosen, ref_rejected = torch.tensor([-108.0]), torch.tensor([-1.0]), torch.tensor([-1.0])
    plain = DPOWithChosenNLL(beta=0.1, nll_weight=0.0)(chosen, rejected, ref_chosen, ref_rejected)[0].sum()
    (plain_grad,) = torch.autograd.grad(plain, chosen)
    anchored = DPOWithChosenNLL(beta=0.1, nll_weight=0.1)(chosen, rejected, ref_chosen, ref_rejected)[0].sum()
    (anchored_grad,) = torch.autograd.grad(anchored, chosen)
    assert abs(plain_grad.item()) < 1e-5
    assert anchored_grad.item() == pytest.approx(plain_grad.item() - 0.1, abs=1e-7)


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, "0.1", None, True])
def test_bad_nll_weight_names_the_field(bad):
    with pytest.raises(ValueError, match=r"loss\.nll_weight must be a finite number >= 0"):
        DPOWithChosenNLL(nll_weight=bad)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf])
def test_bad_beta_names_the_field(bad):
    with pytest.raises(ValueError, match=r"loss\.beta must be > 0"):
        DPOWithChosenNLL(beta=bad)
