"""LARS and the learning-rate schedule (paper §7.1, following BYOL)."""
import math

import torch


def is_excluded(name: str, param: torch.Tensor) -> bool:
    """Biases and normalisation parameters (1-D tensors) get no weight decay and no LARS adaptation (BYOL)."""
    return param.ndim <= 1


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio eta * ||w|| / ||g + wd w|| (You et al. 2017, as BYOL)."""

    def __init__(self, param_groups, lr, momentum=0.9, weight_decay=1e-5, trust_coefficient=1e-3):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        lars=True)
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every group with foreach ops (a handful of fused calls instead of a loop per tensor)."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad for p in params]
            if group["lars"]:
                updates = torch._foreach_add(updates, params, alpha=group["weight_decay"])
                w_norms, u_norms = torch._foreach_norm(params), torch._foreach_norm(updates)
                trust = [torch.where((w > 0) & (u > 0), group["trust_coefficient"] * w / u, torch.ones_like(w))
                         for w, u in zip(w_norms, u_norms)]
                updates = torch._foreach_mul(updates, trust)
            carried = [(self.state[p]["momentum_buffer"], u) for p, u in zip(params, updates)
                       if "momentum_buffer" in self.state[p]]
            for p, u in zip(params, updates):
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = u.clone()
            if carried:
                bufs, ups = zip(*carried)
                torch._foreach_mul_(list(bufs), group["momentum"])
                torch._foreach_add_(list(bufs), list(ups))
            torch._foreach_add_(params, [self.state[p]["momentum_buffer"] for p in params], alpha=-group["lr"])


def lars_param_groups(named_params):
    """Two groups: weights (decay + LARS) and biases / norm parameters (neither)."""
    regular, excluded = [], []
    for name, p in named_params:
        if p.requires_grad:
            (excluded if is_excluded(name, p) else regular).append(p)
    return [{"params": regular}, {"params": excluded, "lars": False, "weight_decay": 0.0}]


def max_learning_rate(base_lr: float, batch_size: int, views: int) -> float:
    """Paper §7.1: max LR = base_lr × batch / 256 × K."""
    return base_lr * batch_size / 256 * views


def learning_rate(step: int, total_steps: int, warmup_steps: int, max_lr: float) -> float:
    """Linear warm-up from 0, then cosine decay to 0 without restarts (paper §7.1)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
