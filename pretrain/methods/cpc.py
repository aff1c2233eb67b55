"""CPC v2-style contrastive predictive coding (van den Oord et al. 2018; Hénaff et al. 2020), as the seed's
SSL survey describes it: the image is cut into a grid of patches overlapping by half, the ResNet encodes
each patch, a context network that sees only the rows at or above a position summarises it, and for k =
1..cpc_pred_steps a linear map W_k of the context predicts the encoding of the patch k + cpc_skip rows
below, scored by InfoNCE against every other patch encoding of the batch.

Departures, recorded: BatchNorm stays in the encoder (CPC v2 uses layer norm there, but the exported backbone
is a torchvision ResNet); predictions run top to bottom only; no per-patch augmentation (the view's
augmentation applies to the whole crop); the context network is a stack of row-masked 3x3 convolutions with
ReLU (rschwarz15/CPCV2-PyTorch uses gated PixelCNN layers). Negatives are this process's batch.
"""
import torch.nn as nn
import torch.nn.functional as F

from core.cli import UserError
from pretrain import losses
from pretrain.methods.base import Method, in_fp32
from pretrain.model import backbone_and_width


class RowMaskedConv(nn.Conv2d):
    """3x3 convolution whose output at row r sees input rows r-2..r only (zero padding above, none below)."""

    def __init__(self, channels):
        super().__init__(channels, channels, 3, padding=0)

    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 2, 0)))


class ContextNetwork(nn.Module):
    def __init__(self, channels, layers):
        super().__init__()
        self.convs = nn.ModuleList(RowMaskedConv(channels) for _ in range(layers))
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        for conv in self.convs:
            x = x + F.relu(conv(x))
        return self.out(x)


class CPCNet(nn.Module):
    def __init__(self, backbone, width, grid, steps, skip, layers):
        super().__init__()
        self.backbone, self.grid, self.skip = backbone, grid, skip
        self.context = ContextNetwork(width, layers)
        self.predictors = nn.ModuleList(nn.Conv2d(width, width, 1, bias=False) for _ in range(steps))

    def forward(self, views):
        x = views[0]
        b, size, g = x.shape[0], x.shape[-1], self.grid
        patch = 2 * size // (g + 1)
        patches = x.unfold(2, patch, patch // 2).unfold(3, patch, patch // 2)  # (b, 3, g, g, patch, patch)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b * g * g, 3, patch, patch)
        z = self.backbone(patches).view(b, g, g, -1).permute(0, 3, 1, 2)  # (b, C, g rows, g columns)
        c = self.context(z)
        preds, targets = [], []
        for k, w in enumerate(self.predictors, start=1):
            off = k + self.skip
            preds.append(w(c[:, :, :g - off]).permute(0, 2, 3, 1).flatten(0, 2))
            targets.append(z[:, :, off:].permute(0, 2, 3, 1).flatten(0, 2))
        return preds, targets, z.permute(0, 2, 3, 1).flatten(0, 2)


class CPC(Method):
    name = "cpc"
    source = "van den Oord et al. 2018 (InfoNCE, patch grid); Hénaff et al. 2020 (CPC v2); rschwarz15/CPCV2-PyTorch"
    keys = ("cpc_grid", "cpc_pred_steps", "cpc_skip", "cpc_context_layers")
    fixed_views = 1

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        if (2 * cfg.crop_size) % (cfg.cpc_grid + 1) or (2 * cfg.crop_size // (cfg.cpc_grid + 1)) % 2:
            raise UserError(f"crop_size {cfg.crop_size} does not cut into a {cfg.cpc_grid} x {cfg.cpc_grid} grid of "
                            "half-overlapping patches: 2 x crop_size / (cpc_grid + 1) must be an even integer")
        if cfg.cpc_pred_steps < 1 or cfg.cpc_pred_steps + cfg.cpc_skip >= cfg.cpc_grid:
            raise UserError(f"cpc_pred_steps {cfg.cpc_pred_steps} + cpc_skip {cfg.cpc_skip} must be below cpc_grid "
                            f"{cfg.cpc_grid} (at least one row to predict from)")

    def __init__(self, cfg, world=1):
        super().__init__(cfg, world)
        backbone, width = backbone_and_width(cfg)
        self.online = CPCNet(backbone, width, cfg.cpc_grid, cfg.cpc_pred_steps, cfg.cpc_skip, cfg.cpc_context_layers)

    @classmethod
    def view_count(cls, cfg):
        return 1

    def loss(self, out, views, g, shared):
        preds, targets, z = out
        per_step = [in_fp32(losses.cpc_infonce_loss, p, t) for p, t in zip(preds, targets)]
        terms = {"loss_cpc": sum(per_step) / len(per_step)}
        return terms["loss_cpc"], terms, z
