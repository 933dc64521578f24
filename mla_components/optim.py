"""AdamW that keeps fp32 master weights for 16-bit parameters, for Torchtune's full-parameter recipes in bf16.

Torchtune's ``dtype: bf16`` trains the bf16 weights themselves. An update smaller than half a bf16 step of the
weight (2^-9 of its magnitude: about 4e-5 for a weight of 0.02) rounds away, so small learning rates stall: DPO at
lr 2e-5 left the SmolLM2 GQA control's reward margins at 0.04 after 48 steps (``docs/results/long_context.md``).
Here each 16-bit parameter gets an fp32 master copy in the optimizer state; the AdamW update is applied to the
master and the parameter is its rounding. The masters live in the state, so Torchtune's optimizer checkpoints save
and resume them (FSDP2 DTensor parameters get DTensor masters). torchao's ``bf16_stochastic_round`` would avoid the
copy, but in torchao 0.14 its compiled step fails on FSDP2 DTensors.

    optimizer:
      _component_: mla_components.optim.MasterWeightAdamW
      lr: 2e-5
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments, as ``torch.optim.AdamW``) with fp32 moments and, for
    parameters that are not fp32, an fp32 master copy that the update is applied to.

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"optimizer.lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"optimizer.betas must be in [0, 1), got {betas}")
        if not eps > 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"optimizer.eps must be > 0 and weight_decay >= 0, got {eps} and {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch's Optimizer.load_state_dict casts floating state to the parameter's dtype; the moments and the
        # masters must stay fp32, so they are taken from the saved state again
        super().load_state_dict(state_dict)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params, strict=True):
            for key in ("exp_avg", "exp_avg_sq", "master"):
                if key in state_dict["state"].get(i, {}):
                    self.state[p][key] = state_dict["state"][i][key].to(p.device, torch.float32, copy=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    if p.dtype != torch.float32:
                        state["master"] = p.detach().to(torch.float32)
                master = state.get("master", p)
                grad = p.grad.to(torch.float32)
                state["step"] = state["step"] + 1  # a new tensor: a loaded state dict may share the old one
                step = float(state["step"])
                state["exp_avg"].lerp_(grad, 1.0 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
                master.mul_(1.0 - lr * decay)
                master.addcdiv_(state["exp_avg"], denom, value=-lr / (1.0 - beta1**step))
                if master is not p:
                    p.copy_(master)
        return loss
