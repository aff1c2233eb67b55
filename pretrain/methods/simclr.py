"""SimCLR v1 and v2 (Chen et al. 2020a, 2020b): NT-Xent over the 2N views of the global batch."""
import torch
import torch.nn as nn

from core.distributed import gather_with_grad
from pretrain import losses
from pretrain.methods.base import Method, in_fp32
from pretrain.model import Encoder, backbone_and_width


def simclr_head(width: int, hidden: int, out: int, layers: int) -> nn.Sequential:
    """SimCLR's projection head (v1 model_util.py projection_head, v2 tf2/model.py ProjectionHead): layers - 1
    blocks of Linear (no bias) - BN - ReLU, then Linear (no bias) - BN without β (`center=False`: the BN bias is
    fixed at 0); dense kernels initialised N(0, 0.01)."""
    mods, d = [], width
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        d = hidden
    last_bn = nn.BatchNorm1d(out)
    last_bn.bias.requires_grad_(False)
    mods += [nn.Linear(d, out, bias=False), last_bn]
    for m in mods:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
    return nn.Sequential(*mods)


class SimCLR(Method):
    name = "simclr"
    source = "google-research/simclr v1 (objective.py add_contrastive_loss, model_util.py, run.py)"
    keys = ("views", "temperature", "proj_hidden", "proj_out", "view_forward")
    head_layers = 2

    def __init__(self, cfg, world=1):
        super().__init__(cfg, world)
        backbone, width = backbone_and_width(cfg)
        self.online = Encoder(backbone, simclr_head(width, cfg.proj_hidden, cfg.proj_out, self.head_layers),
                              per_view=cfg.view_forward == "per_view")

    def loss(self, out, views, g, shared):
        z1, z2 = (gather_with_grad(z) for z in out[0])  # negatives from the global batch, as SimCLR's TPU code
        terms = {"loss_nt_xent": in_fp32(losses.nt_xent_loss, z1, z2, self.cfg.temperature)}
        return terms["loss_nt_xent"], terms, torch.cat(out[0])


class SimCLRv2(SimCLR):
    """SimCLR v2: the same loss with a 3-layer projection head (tf2/model.py num_proj_layers=3); its
    semi-supervised fine-tuning starts from the head's first layer (ft_proj_selector=1), which last.pth keeps
    (online.projector.0-2)."""
    name = "simclrv2"
    source = "google-research/simclr v2 (tf2/model.py ProjectionHead, README pretraining commands)"
    head_layers = 3

