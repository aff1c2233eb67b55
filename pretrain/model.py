"""Networks shared by the pretraining methods: the backbone with its heads run over a list of views, the
heads of BYOL / W-MSE, the momentum (EMA) copy of a network and its update."""
import copy
import math

import torch
import torch.nn as nn

from backbones.resnet import build_backbone
from core.cli import UserError


def backbone_and_width(cfg) -> tuple:
    """The ResNet of the config (its stem) and the width of its pooled features."""
    backbone = build_backbone(cfg.arch, cfg.stem)
    with torch.no_grad():
        width = backbone.eval()(torch.zeros(2, 3, 64, 64)).shape[1]
    return backbone.train(), width


def mlp_head(in_dim: int, hidden: int, out: int, norm: str) -> nn.Sequential:
    """Linear - norm - ReLU - Linear (BYOL's heads, W-MSE's head; Table 13 swaps BatchNorm for LayerNorm)."""
    norms = {"batchnorm": nn.BatchNorm1d, "layernorm": nn.LayerNorm}
    if norm not in norms:
        raise UserError(f"head_norm must be batchnorm or layernorm, not {norm!r}")
    return nn.Sequential(nn.Linear(in_dim, hidden), norms[norm](hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


def run_views(fn, views: list, per_view: bool) -> list:
    """`fn` on each view separately (BatchNorm statistics per view), or on all views of one size in one pass."""
    if per_view:
        return [fn(v) for v in views]
    out, groups = [None] * len(views), {}
    for i, v in enumerate(views):
        groups.setdefault(tuple(v.shape[1:]), []).append(i)
    for idx in groups.values():
        y = fn(torch.cat([views[i] for i in idx]))
        for i, part in zip(idx, y.split([views[i].shape[0] for i in idx])):
            out[i] = part
    return out


class Encoder(nn.Module):
    """backbone + projector [+ predictor] over a list of views; forward returns (projections, predictions or None),
    one tensor per view.

    per_view: every network runs once per view (BYOL, W-MSE's encoder); otherwise once per view size.
    head_on_concat: the projector runs once on all views' features together (W-MSE's `head(torch.cat(h))`)."""

    def __init__(self, backbone, projector, predictor=None, per_view=True, head_on_concat=False):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor
        self.per_view, self.head_on_concat = per_view, head_on_concat

    def forward(self, views):
        h = run_views(self.backbone, views, self.per_view)
        if self.head_on_concat:
            z = list(self.projector(torch.cat(h)).split([x.shape[0] for x in h]))
        else:
            z = run_views(self.projector, h, self.per_view)
        p = run_views(self.predictor, z, self.per_view) if self.predictor is not None else None
        return z, p


def momentum_copy(online: Encoder) -> Encoder:
    """backbone + projector of `online`, as the target (BYOL) or key encoder (MoCo): never trained, only moved
    towards the online weights by `ema_update`; it runs in training mode (batch statistics), as in BYOL and MoCo."""
    target = Encoder(copy.deepcopy(online.backbone), copy.deepcopy(online.projector), None, online.per_view,
                     online.head_on_concat)
    return target.requires_grad_(False)


def target_pairs(target: nn.Module, online: nn.Module):
    """Matching (target, online) parameter and floating-point buffer lists of the backbone and projector."""
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
    if t_bufs:  # networks without BatchNorm have no statistics to copy (foreach ops refuse empty lists)
        torch._foreach_copy_(t_bufs, o_bufs)


def tau_schedule(step: int, total_steps: int, tau_base: float) -> float:
    """BYOL §3.2: τ = 1 - (1 - τ_base) (cos(π k / K) + 1) / 2, rising from τ_base to 1."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * step / max(1, total_steps)) + 1) / 2
