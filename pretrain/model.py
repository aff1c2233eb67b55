"""Online and target networks (BYOL's architecture, paper §7.2) and the EMA update."""
import copy
import math

import torch
import torch.nn as nn

from backbones.resnet import build_backbone
from core.cli import UserError


def mlp_head(in_dim: int, hidden: int, out: int, norm: str) -> nn.Sequential:
    """Linear - norm - ReLU - Linear (BYOL's heads; Table 13 swaps BatchNorm for LayerNorm)."""
    norms = {"batchnorm": nn.BatchNorm1d, "layernorm": nn.LayerNorm}
    if norm not in norms:
        raise UserError(f"head_norm must be batchnorm or layernorm, not {norm!r}")
    return nn.Sequential(nn.Linear(in_dim, hidden), norms[norm](hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


class Online(nn.Module):
    """backbone + projector + predictor; forward returns (predictions p, projections z)."""

    def __init__(self, arch, proj_hidden, proj_out, pred_hidden, head_norm):
        super().__init__()
        self.backbone = build_backbone(arch)
        with torch.no_grad():
            feat_dim = self.backbone.eval()(torch.zeros(2, 3, 64, 64)).shape[1]
        self.backbone.train()
        self.projector = mlp_head(feat_dim, proj_hidden, proj_out, head_norm)
        self.predictor = mlp_head(proj_out, pred_hidden, proj_out, head_norm)

    def forward(self, x):
        z = self.projector(self.backbone(x))
        return self.predictor(z), z


class Target(nn.Module):
    """backbone + projector, an exponential moving average of the online ones; never trained."""

    def __init__(self, online: Online):
        super().__init__()
        self.backbone = copy.deepcopy(online.backbone)
        self.projector = copy.deepcopy(online.projector)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x):
        return self.projector(self.backbone(x))


def target_pairs(target: Target, online: Online):
    """Matching (target, online) parameter and floating-point buffer lists for the EMA update."""
    pairs = []
    for t_mod, o_mod in ((target.backbone, online.backbone), (target.projector, online.projector)):
        pairs.append((list(t_mod.parameters()), list(o_mod.parameters()),
                      [b for b in t_mod.buffers() if b.is_floating_point()],
                      [b for b in o_mod.buffers() if b.is_floating_point()]))
    return tuple(sum((list(p[i]) for p in pairs), []) for i in range(4))


@torch.no_grad()
def ema_update(pairs, tau: float):
    """ξ <- τ ξ + (1 - τ) θ with foreach ops (one fused call per list); BN statistics are copied."""
    t_params, o_params, t_bufs, o_bufs = pairs
    torch._foreach_lerp_(t_params, o_params, 1.0 - tau)
    torch._foreach_copy_(t_bufs, o_bufs)


def tau_schedule(step: int, total_steps: int, tau_base: float) -> float:
    """BYOL §3.2: τ = 1 - (1 - τ_base) (cos(π k / K) + 1) / 2, rising from τ_base to 1."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * step / max(1, total_steps)) + 1) / 2
