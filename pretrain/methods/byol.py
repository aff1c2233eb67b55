"""BYOL (Grill et al. 2020) and the paper's BYOL variants: + L_s / + L_b (Tables 8, 11, 12), + uniformity
(Table 12), + multi-crop (Table 7)."""
import dataclasses

import torch

from core.cli import UserError
from core.distributed import gather_with_grad
from pretrain import losses
from pretrain.methods.base import BYOL_NET_KEYS, in_fp32, view_augments
from pretrain.methods.msbreg import REGULARISER_KEYS, MSBReg


class BYOL(MSBReg):
    """BYOL's symmetrised loss on K = 2 views; λ_s > 0 or λ_b > 0 add the paper's L_s / L_b (Table 8's
    'BYOL (+L_s)', 'BYOL (+L_b)'; Table 11's BYOL rows), λ_s = λ_b = 0 is plain BYOL."""
    name = "byol"
    source = "BYOL (deepmind-research byol/byol_experiment.py loss_fn); paper Tables 8, 11"
    keys = BYOL_NET_KEYS + REGULARISER_KEYS
    fixed_views = 2
    alignment = ("loss_byol", "byol_loss")


class BYOLUniformity(MSBReg):
    """BYOL + w (L_unif(p̂_1) + L_unif(p̂_2)) / 2 (Table 12), Wang & Isola's uniformity on the online predictions,
    the vectors BYOL's loss aligns; over the global batch."""
    name = "byol_uniformity"
    source = "BYOL + Wang & Isola 2020 (SsnL/align_uniform uniform_loss); paper Table 12"
    keys = BYOL_NET_KEYS + ("uniformity_weight", "uniformity_t")
    fixed_views = 2

    def loss(self, out, views, g, shared):
        z_online, p = out
        z = self.target_projections(views)
        terms = {"loss_byol": losses.byol_loss(torch.stack(p, 1), z)}
        unif = [in_fp32(losses.uniformity_loss, gather_with_grad(v), self.cfg.uniformity_t) for v in p]
        terms["loss_uniformity"] = sum(unif) / 2
        return terms["loss_byol"] + self.cfg.uniformity_weight * terms["loss_uniformity"], terms, torch.cat(z_online)


class BYOLMultiCrop(MSBReg):
    """BYOL with SwAV's multi-crop (Table 7): 2 large crops and `small_crops` small ones; the target sees the large
    crops only, each target projection is predicted from every other crop (solo-learn's pairing)."""
    name = "byol_multicrop"
    source = "SwAV README (crops); solo-learn solo/methods/byol.py (pairing); paper Table 7"
    keys = BYOL_NET_KEYS + ("small_crops", "small_crop_size", "small_crop_scale")
    fixed_views = 2

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        scale = tuple(cfg.small_crop_scale)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise UserError(f"small_crop_scale must be two areas 0 < min <= max <= 1, not {list(cfg.small_crop_scale)}")
        if cfg.small_crops < 1 or cfg.small_crop_size > cfg.crop_size:
            raise UserError("byol_multicrop needs small_crops >= 1 and small_crop_size <= crop_size")

    @classmethod
    def view_count(cls, cfg):
        return 2 + cfg.small_crops

    def augments(self):
        augs = view_augments(self.cfg, self.view_count(self.cfg))
        small = dict(crop_size=self.cfg.small_crop_size, crop_scale=tuple(self.cfg.small_crop_scale))
        return augs[:2] + [dataclasses.replace(a, **small) for a in augs[2:]]

    def loss(self, out, views, g, shared):
        z_online, p = out
        with torch.no_grad():
            z_target = self.target(views[:2])[0]
        terms = {"loss_byol_multicrop": losses.byol_multicrop_loss(p, z_target)}
        return terms["loss_byol_multicrop"], terms, torch.cat(z_online[:2])

