"""Finetuning a Vision Transformer end to end on the 1% / 10% subsets: AdamW with layer-wise LR decay, as the
ViT releases finetune (MAE main_finetune.py, iBOT's layer-decay finetuning), instead of the SGD recipe
SimCLR gives ResNets. `tasks.classifier_training` picks this strategy for a finetuned ViT (checkpoint family
"vit"); everything else (data, batches, loss, state, scoring) is the shared engine's.

Per layer, LR = peak LR x layer_decay ^ (depth + 1 - layer), layer 0 the patch / position embeddings and the
CLS token, layer i the i-th block, the final norm and the head at scale 1 (BEiT / MAE util/lr_decay.py; see
`layer_decay_groups` for why not timm's `param_groups_layer_decay`). Peak LR = blr x global batch / 256 (MAE), reached after a linear
warm-up and followed by a cosine decay to min_lr, per step (MAE util/lr_sched.py). Biases, norms, the
position embedding and the CLS token get no weight decay (timm's `no_weight_decay`, MAE). Not taken over
from MAE's ImageNet recipe: RandAugment, mixup / cutmix, label smoothing, random erasing (the task's
augmentation is SimCLR's fine-tuning crop and flip on 1% / 10% of the images).
"""
import math

import torch

from tasks.classifier_training import FinetunedEncoder

MAE_FT = "MAE FINETUNE.md / main_finetune.py"
IBOT_SEMI = "iBOT's layer-decay finetuning commands (as gathered in notes/vit_facts.md, not rechecked)"
# embed_dim -> ((blr, source), (layer decay, source), (drop path, source)); facts gathered from the releases
# (notes/vit_facts.md): MAE ViT-B blr 5e-4, layer decay 0.65, drop path 0.1; ViT-L/H blr 1e-3, layer decay 0.75;
# iBOT ViT-S layer decay 0.75, drop path 0.1; ViT-B 0.65 / 0.2; ViT-L 0.75 / 0.4.
SIZES = {
    192: ((5e-4, "no release finetunes a ViT-Ti: ViT-S's values"), (0.75, "as ViT-S"), (0.1, "as ViT-S")),
    384: ((5e-4, f"MAE gives no ViT-S value: ViT-B's ({MAE_FT})"), (0.75, f"{IBOT_SEMI}, ViT-S"),
          (0.1, f"{IBOT_SEMI}, ViT-S")),
    768: ((5e-4, f"{MAE_FT}, ViT-B"), (0.65, f"{IBOT_SEMI} and {MAE_FT}, ViT-B"), (0.2, f"{IBOT_SEMI}, ViT-B")),
    1024: ((1e-3, f"{MAE_FT}, ViT-L"), (0.75, f"{IBOT_SEMI} and {MAE_FT}, ViT-L"), (0.4, f"{IBOT_SEMI}, ViT-L")),
    1280: ((1e-3, f"{MAE_FT}, ViT-H"), (0.75, f"{MAE_FT}, ViT-H"), (0.4, "no semi-supervised value: ViT-L's")),
}


def size_values(width: int) -> dict:
    """{name: (value, source)} of the size nearest to `width` (the ViT's embed_dim)."""
    nearest = min(SIZES, key=lambda w: abs(w - width))
    (blr, layer_decay, drop_path) = SIZES[nearest]
    return {"blr": blr, "layer_decay": layer_decay, "drop_path": drop_path}


def layer_decay_groups(vit, weight_decay: float, layer_decay: float) -> list:
    """Parameter groups of a timm VisionTransformer by MAE's rule (util/lr_decay.py, after BEiT): layer 0 the
    embeddings and prefix tokens, layer i + 1 block i, layer depth + 1 the rest (final norm); lr_scale
    layer_decay ^ (depth + 1 - layer); no weight decay on 1-D tensors and the model's no_weight_decay() names.

    Not timm's param_groups_layer_decay, which the family contract names: it puts the last block in the final
    norm's layer (scale 1), one power of layer_decay less on every layer than MAE's and iBOT's recipe, whose
    values (blr, layer decay) are the ones used here."""
    depth, skip = len(vit.blocks), set(vit.no_weight_decay())
    groups = {}
    for name, q in vit.named_parameters():
        if not q.requires_grad:
            continue
        if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = depth + 1
        decay = 0.0 if q.ndim <= 1 or name in skip else weight_decay
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": decay,
                                                   "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(q)
    return [groups[k] for k in sorted(groups)]


class ViTFinetunedEncoder(FinetunedEncoder):
    """AdamW with layer-wise LR decay over `model.vit` (timm parameter names), warm-up and cosine per step,
    drop path set at build time. Values: the protocol's vit_* keys when given, else the size's."""
    name = "finetuned_vit"

    def __init__(self, p):
        self.given = {k: getattr(p, f"vit_{k}", None) for k in ("blr", "layer_decay", "drop_path")}
        self.weight_decay = getattr(p, "vit_weight_decay", 0.05)
        self.warmup_epochs = getattr(p, "vit_warmup_epochs", 5)
        self.min_lr = getattr(p, "vit_min_lr", 1e-6)
        self.values = None  # set when the encoder is built (they depend on its width)

    def encoder(self, ctx, device):
        model = super().encoder(ctx, device)
        sized = size_values(model.vit.embed_dim)
        self.values = {k: (v, "the protocol") if v is not None else sized[k] for k, v in self.given.items()}
        rate = self.values["drop_path"][0]
        if rate:
            from backbones.families import rebuild_with_drop_path

            model = rebuild_with_drop_path(model, rate).to(device)
        return model

    def peak_lr(self, p):
        return self.values["blr"][0] * p.train_batch_size / 256

    def param_groups(self, p, head, encoder):
        groups = layer_decay_groups(encoder.vit, self.weight_decay, self.values["layer_decay"][0])
        decay = [q for q in head.parameters() if q.ndim > 1]
        plain = [q for q in head.parameters() if q.ndim <= 1]
        groups += [{"params": decay, "weight_decay": self.weight_decay, "lr_scale": 1.0},
                   {"params": plain, "weight_decay": 0.0, "lr_scale": 1.0}]
        return [g for g in groups if g["params"]]

    def optimizer(self, p, groups):
        return torch.optim.AdamW(groups, lr=self.peak_lr(p))  # MAE: AdamW with its default betas

    def learning_rate(self, p, epoch, step, steps_per_epoch):
        """MAE util/lr_sched.py: linear warm-up over warmup_epochs, then half a cosine to min_lr, per step."""
        peak, t = self.peak_lr(p), epoch + step / steps_per_epoch
        if t < self.warmup_epochs:
            return peak * t / self.warmup_epochs
        progress_ = (t - self.warmup_epochs) / max(1e-12, p.epochs - self.warmup_epochs)
        return self.min_lr + (peak - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress_))

    def apply_lr(self, opt, p, lr):
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]

    def describe(self):
        values = {k: {"value": v, "source": src} for k, (v, src) in self.values.items()}
        return {"optimizer": "AdamW, layer-wise LR decay by MAE's rule (util/lr_decay.py) on model.vit",
                **values, "weight_decay": {"value": self.weight_decay, "source": f"{MAE_FT} --weight_decay"},
                "warmup_epochs": {"value": self.warmup_epochs, "source": f"{MAE_FT} --warmup_epochs"},
                "min_lr": {"value": self.min_lr, "source": f"{MAE_FT} --min_lr"},
                "peak_lr": "blr x batch / 256 (MAE)"}
