"""Linear classifiers trained with SGD on a frozen encoder (paper §8.4: Places205, iNaturalist 2018; and
`protocol=sgd` of the other linear tasks), through `classifier_training.train_and_score`."""
from dataclasses import dataclass

from core.settings import setting
from tasks.classifier_training import SCHEDULES, train_and_score
from tasks.context import TaskOutput
from tasks.frozen import FrozenFeatureProtocol, input_normalization, read_splits

PAPER_84 = "paper §8.4: SGD momentum 0.9, weight decay 1e-4, batch 256, LR 0.2 divided by 10 twice at equal intervals"
BN_HEAD = ("a BatchNorm before the linear layer, as every Places205 / iNat18 benchmark has (Goyal et al. 2019, "
           "fair_self_supervision_benchmark: BN_NO_SCALE_SHIFT, without affine parameters; VISSL's eval_mlp; MAE's "
           "linear probe: BatchNorm1d(affine=False)): the paper's LR 0.2 on raw pooled features diverges on an "
           "encoder whose features are large (a random ResNet-50: loss 7 -> 137,012)")
NESTEROV = ("VISSL's Places205 / iNaturalist 2018 linear configs (OPTIMIZER.nesterov True) and Goyal et al.'s "
            "(NESTEROV True); the paper states momentum 0.9 only")
BARLOW = ("Barlow Twins App. C.1 (whose Table 3 is the source of Table 5's Places205 / iNat18 baseline rows): LR "
          "0.01 divided by 10 at two equally spaced intervals, weight decay 5e-4, momentum 0.9, 14 epochs (Places205), "
          "84 (iNat18)")
PROTOCOLS = ("paper", "barlowtwins", "byol")


def presets(dataset: str) -> dict:
    """The published protocols of the Places205 / iNat18 probes: the paper's (§8.4), for its own rows, and
    Barlow Twins', by which Table 5's baseline rows were measured. {name: {key: (value, source)}}."""
    return {"paper": {}, "barlowtwins": {"lr": (0.01, BARLOW), "weight_decay": (5e-4, BARLOW),
                                         "epochs": (14 if dataset == "places205" else 84, BARLOW)}}


@dataclass(frozen=True)
class LinearSgdProtocol(FrozenFeatureProtocol):
    protocol: str = setting("paper", "paper: §8.4's values (the paper's own rows); barlowtwins: the protocol of "
                                     "Table 5's baseline rows; byol: protocol=sgd of the other linear tasks",
                            choices=PROTOCOLS)
    epochs: int = setting(28, "paper §8.4: 28 epochs (Places205), 84 (iNat18)")
    lr: float = setting(0.2, PAPER_84)
    momentum: float = setting(0.9, PAPER_84)
    weight_decay: float = setting(1e-4, PAPER_84)
    train_batch_size: int = setting(256, PAPER_84)
    schedule: str = setting("step", "step: divided by 10 at 1/3 and 2/3 of training (paper §8.4); cosine: per step",
                            choices=SCHEDULES)
    train_crop_scale_min: float = setting(0.08, "torchvision's RandomResizedCrop default (scale 0.08-1)")
    init_std: float = setting(0.01, "MoCo's linear classification: weights N(0, 0.01), bias 0")
    nesterov: bool = setting(True, NESTEROV)
    head_batchnorm: bool = setting(True, BN_HEAD)
    head_batchnorm_eps: float = setting(1e-6, "MAE's linear probe: BatchNorm1d(affine=False, eps=1e-6)")
    encoder_lr: float = setting(0.0, "0: frozen encoder (linear evaluation)")
    metric_infix: str = setting("_linear", "metric names of results/paper/paper_tables.csv (<prefix>_linear_top1)")


def run(ctx, p: LinearSgdProtocol, task_name="linear_sgd") -> TaskOutput:
    splits = read_splits(ctx, p)
    info = {}
    mean, std = input_normalization(ctx, p, info)
    acc, extra = train_and_score(ctx, p, splits["train"], splits["test"], mean, std, task_name)
    if acc is None:
        return TaskOutput({})
    return TaskOutput({f"{p.metric_prefix}{p.metric_infix}_top1": acc[1],
                       f"{p.metric_prefix}{p.metric_infix}_top5": acc[5]}, {**info, **extra},
                      probe={"probe": f"sgd:{p.protocol}", "epochs": p.epochs})
