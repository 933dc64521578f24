"""DPO with a likelihood anchor on the chosen answer, for Torchtune's ``full_dpo_distributed``.

Plain DPO only scores the *difference* of the chosen and rejected log-likelihoods against the reference. Both can
fall: in attempt 6b of ``docs/results/long_context.md`` the chosen answers' summed log-probability fell from a
median of -0.05 to -2.5 (as low as -18) in 48 steps while the margin grew, and the model's misses at 32k and 128k
became run-ons of the value (``78888888888``), which the SFT model it started from never produced. Adding the chosen
answer's negative log-likelihood to the loss (as in Pang et al. 2024, "Iterative Reasoning Preference Optimization")
keeps the chosen answer likely, end-of-answer token included, while DPO pushes the rejected one down.

    loss:
      _component_: mla_components.losses.DPOWithChosenNLL
      beta: 0.1
      nll_weight: 0.1

The recipe passes summed log-probabilities per sequence, not their token counts, so ``nll_weight`` scales a *summed*
NLL. The needle answers are 6-12 tokens, so 0.1 is about the paper's weight of 1 on the per-token NLL.
"""

from __future__ import annotations

import math

import torch
from torchtune.rlhf.loss import DPOLoss


class DPOWithChosenNLL(DPOLoss):
    """Torchtune's ``DPOLoss`` plus ``nll_weight`` x the chosen sequence's negative log-likelihood.

    Args:
        beta, label_smoothing: as in ``torchtune.rlhf.loss.DPOLoss``.
        nll_weight: weight of ``-policy_chosen_logps`` (a sum over the answer's tokens); 0 is plain DPO.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, nll_weight: float = 0.1) -> None:
        def number(x) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

        if not (number(nll_weight) and nll_weight >= 0):
            raise ValueError(f"loss.nll_weight must be a finite number >= 0 (0 is plain DPO), got {nll_weight!r}")
        if not (number(beta) and beta > 0):
            raise ValueError(f"loss.beta must be > 0 (DPO's temperature, typically 0.1-0.5), got {beta!r}")
        super().__init__(beta=beta, label_smoothing=label_smoothing)
        self.nll_weight = float(nll_weight)

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: torch.Tensor,
        reference_rejected_logps: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All inputs ``[batch]`` summed log-probabilities; returns ``(losses [batch], chosen_rewards [batch],
        rejected_rewards [batch])`` as ``DPOLoss`` does (the rewards are DPO's, without the NLL term)."""
        losses, chosen_rewards, rejected_rewards = super().forward(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
        )
        return losses - self.nll_weight * policy_chosen_logps, chosen_rewards, rejected_rewards
