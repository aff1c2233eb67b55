"""DrLIM (Hadsell, Chopra & LeCun 2006) as a self-supervised method: the two views of an image are a similar
pair, views of different images dissimilar pairs, under the contrastive margin loss."""
import torch

from core.distributed import gather_with_grad
from pretrain import losses
from pretrain.methods.base import Method, in_fp32
from pretrain.model import Encoder, backbone_and_width, mlp_head


class DrLIM(Method):
    name = "drlim"
    source = "Hadsell, Chopra & LeCun, CVPR 2006, Eq. 4 (no public code of the authors)"
    keys = ("views", "margin", "proj_hidden", "proj_out", "head_norm", "view_forward")

    def __init__(self, cfg, world=1):
        super().__init__(cfg, world)
        backbone, width = backbone_and_width(cfg)
        self.online = Encoder(backbone, mlp_head(width, cfg.proj_hidden, cfg.proj_out, cfg.head_norm),
                              per_view=cfg.view_forward == "per_view")

    def loss(self, out, views, g, shared):
        z1, z2 = (gather_with_grad(z) for z in out[0])
        terms = {"loss_drlim": in_fp32(losses.drlim_loss, z1, z2, self.cfg.margin)}
        return terms["loss_drlim"], terms, torch.cat(out[0])
