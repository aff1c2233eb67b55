"""W-MSE 2 and W-MSE 4 (Ermolov et al. 2021; htdt/self-supervised methods/w_mse.py): whitened views, MSE."""
import torch

from core.cli import UserError
from core.distributed import gather_with_grad
from pretrain import losses
from pretrain.methods.base import Method, in_fp32
from pretrain.model import Encoder, backbone_and_width, mlp_head


class WMSE(Method):
    name = "wmse"
    source = "htdt/self-supervised (methods/w_mse.py, methods/whitening.py, model.py, README commands)"
    keys = ("views", "w_size", "w_iter", "w_eps", "proj_hidden", "proj_out", "head_norm", "view_forward")
    fixed_views = None

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        micro = cfg.batch_size // cfg.accumulate
        if micro % cfg.w_size:
            raise UserError(f"w_size {cfg.w_size} must divide the batch of one step ({micro} images)")
        if cfg.w_size <= cfg.proj_out:
            raise UserError(f"w_size {cfg.w_size} must exceed proj_out {cfg.proj_out}, or the covariance of a "
                            "sub-batch is singular (lightly asks for w_size >= 2 x proj_out)")

    def __init__(self, cfg, world=1):
        super().__init__(cfg, world)
        backbone, width = backbone_and_width(cfg)
        # Encoder per view, head on all views at once (w_mse.py: self.head(torch.cat(h))).
        self.online = Encoder(backbone, mlp_head(width, cfg.proj_hidden, cfg.proj_out, cfg.head_norm),
                              per_view=cfg.view_forward == "per_view", head_on_concat=True)

    def loss(self, out, views, g, shared):
        z = torch.stack([gather_with_grad(v) for v in out[0]])  # (K, global batch, d)
        terms = {"loss_wmse": in_fp32(losses.wmse_loss, z, self.cfg.w_size, self.cfg.w_iter, self.cfg.w_eps,
                                               shared)}
        return terms["loss_wmse"], terms, torch.cat(out[0])
