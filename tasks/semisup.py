"""Semi-supervised ImageNet (paper §8.2): a classifier trained on SimCLR's 1% subset on the frozen encoder,
and encoder and classifier finetuned on the 10% subset; scored on the full validation set."""
from dataclasses import dataclass
from typing import Optional

from core.settings import setting
from datasets.catalog import SUBDIRS
from datasets.imagenet import read_simclr_subset
from tasks.classifier_training import SCHEDULES, train_and_score
from tasks.context import TaskOutput
from tasks.frozen import FrozenFeatureProtocol, default_tap, input_normalization, is_vit, read_splits
from tasks.linear import subset_logistic_regression

SEMISUP = "paper §8.2: SGD with Nesterov momentum 0.9, batch 1024"
SIMCLR_B5 = ("not stated by the paper; SimCLR's semi-supervised protocol, whose 1%/10% lists the paper uses "
             "(Chen et al. 2020, App. B.5): 60 epochs for 1%, 30 for 10%, no weight decay, no warm-up")
SIMCLR_SCHEDULE = ("not stated by the paper; SimCLR's fine-tuning (App. B.5: no warm-up) runs its one LR schedule, "
                   "cosine decay per step (google-research/simclr, tf2/run.py WarmUpAndCosineDecay)")


@dataclass(frozen=True)
class SemisupProtocol(FrozenFeatureProtocol):
    """The 1% task's values by default; the 10% task overrides epochs, lr and encoder_lr."""

    num_classes: int = setting(1000, "ImageNet")
    metric_prefix: str = setting("semisup1", "metric names of results/paper/paper_tables.csv (semisup1_top1)")
    train_subset: str = setting("1percent.txt", "SimCLR's subset lists: 1percent.txt (12,811 images), "
                                                "10percent.txt (128,116)")
    epochs: int = setting(60, SIMCLR_B5)
    lr: float = setting(2.0, "paper §8.2: classifier LR 2.0 (1%), 0.25 (10%)")
    encoder_lr: float = setting(0.0, "paper §8.2: encoder frozen (1%), encoder LR 2.5e-4 (10%)")
    momentum: float = setting(0.9, SEMISUP)
    nesterov: bool = setting(True, SEMISUP)
    weight_decay: float = setting(0.0, SIMCLR_B5)
    train_batch_size: int = setting(1024, SEMISUP)
    schedule: str = setting("cosine", SIMCLR_SCHEDULE, choices=SCHEDULES)
    train_crop_scale_min: float = setting(0.08, "torchvision's RandomResizedCrop default (scale 0.08-1), as SimCLR's "
                                                "fine-tuning crop")
    init_std: float = setting(0.01, "MoCo's linear classification: weights N(0, 0.01), bias 0")
    head_batchnorm: bool = setting(False, "SimCLR fine-tunes a plain linear head")
    head_batchnorm_eps: float = setting(1e-6, "unused without head_batchnorm")
    # A finetuned ViT trains with AdamW and layer-wise LR decay instead (tasks/semisup_vit.py); None: the value of
    # its size there (MAE's blr, iBOT's layer decay and drop path)
    vit_blr: Optional[float] = setting(None, "ViT finetuning: peak LR = blr x batch / 256 (MAE main_finetune.py); "
                                             "None: per size")
    vit_layer_decay: Optional[float] = setting(None, "ViT finetuning: layer-wise LR decay (BEiT / MAE); None: per size")
    vit_drop_path: Optional[float] = setting(None, "ViT finetuning: stochastic depth rate; None: per size")
    vit_weight_decay: float = setting(0.05, "ViT finetuning: MAE main_finetune.py --weight_decay 0.05")
    vit_warmup_epochs: float = setting(5.0, "ViT finetuning: MAE main_finetune.py --warmup_epochs 5")
    vit_min_lr: float = setting(1e-6, "ViT finetuning: MAE main_finetune.py --min_lr 1e-6")
    vit_frozen: str = setting("logreg", "a frozen ViT (encoder_lr 0, the 1% task): logreg = logistic regression on "
                                        "the L2-normalised CLS features, L2 strength chosen on held-out subset images "
                                        "(iBOT evaluation/eval_logistic_regression.py, MSN's protocol); sgd = the "
                                        "ResNet classifier above", choices=("logreg", "sgd"))


def run(ctx, p: SemisupProtocol, task_name="semisup") -> TaskOutput:
    splits = read_splits(ctx, p)
    subset = ctx.data_root / SUBDIRS["imagenet_subsets"] / p.train_subset
    train = read_simclr_subset(ctx.data_root / SUBDIRS["imagenet"], subset, num_classes=p.num_classes)
    info = {"train_subset": p.train_subset}
    if is_vit(ctx) and p.encoder_lr == 0 and p.vit_frozen == "logreg":
        acc, extra = subset_logistic_regression(ctx, p, train, splits["test"])
        probe = {"probe": "semisup:logreg", "tap": default_tap(ctx)}
    else:
        mean, std = input_normalization(ctx, p, info)
        acc, extra = train_and_score(ctx, p, train, splits["test"], mean, std, task_name)
        probe = {"probe": "semisup:simclr", "epochs": p.epochs}
    if acc is None:
        return TaskOutput({})
    return TaskOutput({f"{p.metric_prefix}_top1": acc[1], f"{p.metric_prefix}_top5": acc[5]}, {**info, **extra},
                      probe=probe)
