"""Barlow Twins (Zbontar et al. 2021; facebookresearch/barlowtwins main.py)."""
import torch
import torch.nn as nn

from core.distributed import gather_with_grad
from pretrain import losses
from pretrain.methods.base import Method, in_fp32
from pretrain.model import Encoder, backbone_and_width


def barlow_projector(width: int, hidden: int, out: int) -> nn.Sequential:
    """main.py: two blocks of Linear (no bias) - BN - ReLU, then Linear (no bias); 8192-8192-8192 on ImageNet."""
    return nn.Sequential(nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out, bias=False))


def zero_init_residual(backbone: nn.Module) -> None:
    """torchvision's zero_init_residual=True, which Barlow Twins' ResNet-50 uses: the last BN of every residual
    block starts at γ = 0."""
    for m in backbone.modules():
        if hasattr(m, "downsample"):  # a residual block (torchvision or timm)
            nn.init.zeros_((m.bn3 if hasattr(m, "bn3") else m.bn2).weight)


class BarlowTwins(Method):
    name = "barlowtwins"
    source = "facebookresearch/barlowtwins main.py"
    keys = ("views", "lambd", "proj_hidden", "proj_out", "view_forward")

    def __init__(self, cfg, world=1):
        super().__init__(cfg, world)
        backbone, width = backbone_and_width(cfg)
        zero_init_residual(backbone)
        self.online = Encoder(backbone, barlow_projector(width, cfg.proj_hidden, cfg.proj_out),
                              per_view=cfg.view_forward == "per_view")

    def loss(self, out, views, g, shared):
        # Statistics and cross-correlation over the global batch, as main.py's SyncBatchNorm and all_reduce.
        z1, z2 = (gather_with_grad(z) for z in out[0])
        terms = {"loss_barlow": in_fp32(losses.barlow_twins_loss, z1, z2, self.cfg.lambd)}
        return terms["loss_barlow"], terms, torch.cat(out[0])
