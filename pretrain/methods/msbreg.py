"""MSBReg (paper §3): K views, EMA target, L = L_c + λ_s L_s + λ_b L_b (Eq. 3-6).

This is the file to copy for a new method: its networks, the config keys it reads, and `loss`, built from
the pure functions of `pretrain/losses.py`.
"""
import torch

from core.distributed import gather_with_grad
from pretrain import losses
from pretrain.methods.base import BYOL_NET_KEYS, Method, byol_networks, in_fp32

REGULARISER_KEYS = ("lambda_s", "lambda_b", "svl_normalize")


def add_regularisers(cfg, p, g, total, terms):
    """+ λ_b L_b (one Gaussian direction per image, from the step's generator) + λ_s L_s (global batch)."""
    if cfg.lambda_b:
        noise = torch.randn(p.shape[0], p.shape[-1], generator=g, device=g.device).to(p.dtype)
        terms["loss_brownian"] = losses.brownian_loss(p, noise)
        total = total + cfg.lambda_b * terms["loss_brownian"]
    if cfg.lambda_s:
        # the batch covariance in float32 with autocast off: in bf16 (8 bits of mantissa) the gradient of
        # ||S - I||² is off by ~4% (d = 64, B = 256; tests/test_losses.py)
        terms["loss_singular"] = in_fp32(losses.singular_value_loss, gather_with_grad(p), cfg.svl_normalize)
        total = total + cfg.lambda_s * terms["loss_singular"]
    return total


class MSBReg(Method):
    name = "msbreg"
    source = "paper §3 (Eq. 3-6), §7"
    keys = BYOL_NET_KEYS + REGULARISER_KEYS
    fixed_views = None
    ema = "cosine"
    # the alignment term that the regularisers are added to: its log name and its function in pretrain.losses
    # (looked up at each step); BYOL swaps it
    alignment = ("loss_centroid", "multiview_centroid_loss")

    def __init__(self, cfg, world=1):
        super().__init__(cfg, world)
        self.online, self.target = byol_networks(cfg)

    def target_projections(self, views):
        with torch.no_grad():
            return torch.stack(self.target(views)[0], 1)

    def loss(self, out, views, g, shared):
        z_online, p = out
        p, z = torch.stack(p, 1), self.target_projections(views)
        name, loss = self.alignment
        terms = {name: getattr(losses, loss)(p, z)}
        total = add_regularisers(self.cfg, p, g, terms[name], terms)
        return total, terms, torch.cat(z_online)
