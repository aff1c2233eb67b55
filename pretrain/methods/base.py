"""What a pretraining method is to the trainer (`pretrain/train.py`).

A method is an nn.Module holding `online` (the network the optimiser trains; its `backbone` is the ResNet
that is exported) and optionally `target` (a momentum copy, moved by EMA after each optimiser step), and it
says which config keys it reads. Each step the trainer cuts the views (`augments`), runs `online(views)`
once (the DDP-wrapped call) and hands its output to `loss`, which returns the loss, its terms for the log
and the embeddings the collapse monitors look at. The loss itself is a pure function of
`pretrain/losses.py`.
"""
import dataclasses

import torch
import torch.nn as nn

from core.cli import UserError
from datasets.views import ViewAugment
from pretrain.model import target_pairs, tau_schedule

# The config keys of the BYOL-style networks (backbone + projector + predictor, EMA target).
BYOL_NET_KEYS = ("views", "tau_base", "proj_hidden", "proj_out", "pred_hidden", "head_norm", "view_forward")


def per_view(value, k, key):
    values = list(value) if isinstance(value, (list, tuple)) else [value] * k
    if len(values) != k:
        raise UserError(f"{key} lists {len(values)} values for {k} views")
    return values


def view_augments(cfg, k=None):
    """One ViewAugment per view; the config's augmentation keys carry ViewAugment's field names."""
    k = k or cfg.views
    blur, sol = per_view(cfg.blur_p, k, "blur_p"), per_view(cfg.solarize_p, k, "solarize_p")
    special = {"crop_size", "crop_scale", "blur_sigma", "blur_p", "solarize_p"}
    same = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ViewAugment) if f.name not in special}
    return [ViewAugment(**same, crop_size=cfg.crop_size, crop_scale=(cfg.crop_scale_min, 1.0),
                        blur_sigma=tuple(cfg.blur_sigma), blur_p=b, solarize_p=s) for b, s in zip(blur, sol)]


def in_fp32(loss_fn, *args):
    """`loss_fn` in float32 with autocast off (AMP runs the networks in bf16 / fp16): W-MSE's Cholesky needs it,
    and logits of contrastive losses keep their precision. Tensor arguments (or lists of them) are cast."""
    def cast(a):
        if isinstance(a, (list, tuple)):
            return [cast(x) for x in a]
        return a.float() if torch.is_tensor(a) and a.is_floating_point() else a

    device = next(a for a in args if torch.is_tensor(a)).device.type
    with torch.autocast(device_type=device, enabled=False):
        return loss_fn(*[cast(a) for a in args])


class Method(nn.Module):
    name = ""            # the config's `method`
    source = ""          # where its defaults come from
    keys = ()            # config keys it reads besides pretrain.config.COMMON_KEYS
    fixed_views = 2      # the views it takes (None: any K >= 2, from the `views` key)
    ema = None           # None, "cosine" (BYOL's τ schedule) or "constant" (MoCo's momentum)
    sync_bn_by_default = True  # sync_bn=auto synchronises BatchNorm over the processes (global batch statistics)

    def __init__(self, cfg, world=1):
        super().__init__()
        self.cfg, self.world = cfg, world
        self.target = None

    @classmethod
    def check(cls, cfg):
        """Values the method cannot take, as one sentence each (raised at config load and at start-up)."""
        if cls.fixed_views and cfg.views != cls.fixed_views:
            raise UserError(f"method {cls.name} takes views={cls.fixed_views}, not {cfg.views}")
        if not cls.fixed_views and cfg.views < 2:
            raise UserError(f"method {cls.name} needs views >= 2, not {cfg.views}")
        for key in ("blur_p", "solarize_p"):
            per_view(getattr(cfg, key), cls.view_count(cfg), key)

    @classmethod
    def view_count(cls, cfg):
        """How many augmented views of each image a step cuts."""
        return cfg.views

    def augments(self):
        return view_augments(self.cfg, self.view_count(self.cfg))

    def loss(self, out, views, g, shared):
        """(total loss, {term name: tensor}, embeddings for the collapse monitors) of the online network's output
        `out` on `views`; `g` is this process's generator of the step, `shared` one seeded alike on every process."""
        raise NotImplementedError

    def ema_pairs(self):
        return target_pairs(self.target, self.online) if self.target is not None and self.ema else None

    def tau(self, step, total):
        return tau_schedule(step, total, self.cfg.tau_base) if self.ema == "cosine" else self.cfg.tau_base


def byol_networks(cfg, predictor=True):
    """BYOL's online network (backbone, projector, predictor: paper §7.2's heads) and its momentum target."""
    from pretrain.model import Encoder, backbone_and_width, mlp_head, momentum_copy

    backbone, width = backbone_and_width(cfg)
    online = Encoder(backbone, mlp_head(width, cfg.proj_hidden, cfg.proj_out, cfg.head_norm),
                     mlp_head(cfg.proj_out, cfg.pred_hidden, cfg.proj_out, cfg.head_norm) if predictor else None,
                     per_view=cfg.view_forward == "per_view")
    return online, momentum_copy(online)
