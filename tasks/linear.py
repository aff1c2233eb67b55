"""Linear classification on frozen features (paper §8.1).

This is the `fast` protocol: features of the centre crop (cached), a multinomial logistic
regression fitted full-batch with L-BFGS, its L2 strength chosen on a split held out from the
training set (never on the test set) and then refitted on all training images, as CLIP's linear
probes do (Radford et al. 2021, App. A.3). `protocol=sgd` trains the classifier with SGD and
augmentation instead (`linear_sgd.py`), with the sgd_* values below.
"""
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from core.settings import setting
from tasks import linear_sgd
from tasks.classifier_training import SCHEDULES
from tasks.context import TaskOutput
from tasks.frozen import FrozenFeatureProtocol, train_test_features
from tasks.metrics import topk_accuracy


SGD_SOURCE = ("protocol=sgd: BYOL's linear evaluation on ImageNet (Grill et al. 2020, App. C.1: SGD with Nesterov "
              "momentum 0.9, no weight decay, cosine decay, random resized crop and flip), with a BatchNorm without "
              "affine parameters before the layer (VISSL's eval_mlp) so that one LR serves every encoder")


@dataclass(frozen=True)
class LinearProtocol(FrozenFeatureProtocol):
    protocol: str = setting("fast", "fast: cached features + L-BFGS logistic regression (CLIP, App. A.3); "
                                    "sgd: SGD with augmentation (the sgd_* values)", choices=("fast", "sgd"))
    l2_grid: tuple[float, ...] = setting((1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
                                         "log-spaced sweep of the L2 strength, as CLIP's linear probes sweep it")
    holdout_fraction: float = setting(0.2, "share of each training class held out to choose the L2 strength")
    max_iter: int = setting(500, "L-BFGS iterations; enough for convergence at these sizes (loss change < 1e-7)")
    sgd_epochs: int = setting(80, SGD_SOURCE + ": 80 epochs")
    sgd_lr: float = setting(0.4, SGD_SOURCE + ": LR 0.4 at batch 1024 scaled to batch 256 (linear scaling) is 0.1; "
                                 "0.4 at 1024")
    sgd_batch_size: int = setting(1024, SGD_SOURCE + ": batch 1024")
    sgd_momentum: float = setting(0.9, SGD_SOURCE)
    sgd_nesterov: bool = setting(True, SGD_SOURCE)
    sgd_weight_decay: float = setting(0.0, SGD_SOURCE)
    sgd_schedule: str = setting("cosine", SGD_SOURCE, choices=SCHEDULES)


# Demo: protocol=sgd over 3 epochs at batch 32 on the small demo trees (like the demo SGD probes).
DEMO_SGD = dict(sgd_epochs=3, sgd_batch_size=32)


def fit_logistic_regression(x, y, num_classes, l2, max_iter=500):
    """Minimise mean cross-entropy + (l2 / 2) * ||W||^2 (bias unpenalised); returns (W (D, C), b (C,))."""
    w = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    # Solver numerics (not protocol): tolerances tight enough that max_iter decides when to stop.
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int):
    """Boolean mask of held-out rows: `fraction` of each class (at least one image if it has two)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n = int(round(fraction * len(rows)))
        n = min(max(n, 1), len(rows) - 1) if len(rows) > 1 else 0
        held[rng.choice(rows, n, replace=False)] = True
    return held


def train_linear_fast(xtr, ytr, num_classes, grid, holdout_fraction, max_iter, seed, device="cpu"):
    """Choose the L2 strength on a held-out part of the training set, refit on all of it."""
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)  # standardise with training statistics only

    def prep(x):
        return ((x - mean) / std).to(device)

    held = torch.from_numpy(stratified_holdout(ytr.numpy(), holdout_fraction, seed))
    search = {}
    for l2 in grid:
        w, b = fit_logistic_regression(prep(xtr[~held]), ytr[~held].to(device), num_classes, l2, max_iter)
        search[l2] = topk_accuracy((prep(xtr[held]) @ w + b).cpu(), ytr[held], (1,))[1]
    best = max(grid, key=lambda l2: (search[l2], l2))  # ties go to the stronger regulariser
    w, b = fit_logistic_regression(prep(xtr), ytr.to(device), num_classes, best, max_iter)
    return (lambda x: (prep(x) @ w + b).cpu()), best, search


def sgd_protocol(p: LinearProtocol) -> linear_sgd.LinearSgdProtocol:
    """The SGD probe that `protocol=sgd` trains: the dataset values of `p` and its sgd_* values."""
    shared = {f.name: getattr(p, f.name) for f in dataclasses.fields(FrozenFeatureProtocol)}
    return linear_sgd.LinearSgdProtocol(**shared, epochs=p.sgd_epochs, lr=p.sgd_lr, train_batch_size=p.sgd_batch_size,
                                        momentum=p.sgd_momentum, nesterov=p.sgd_nesterov,
                                        weight_decay=p.sgd_weight_decay, schedule=p.sgd_schedule)


def run(ctx, p: LinearProtocol) -> TaskOutput:
    if p.protocol == "sgd":
        return linear_sgd.run(ctx, sgd_protocol(p), task_name=f"linear_{p.metric_prefix}_sgd")
    (xtr, ytr), (xte, yte), info = train_test_features(ctx, p)
    torch.manual_seed(ctx.seed)
    predict, best, search = train_linear_fast(xtr, ytr, p.num_classes, p.l2_grid, p.holdout_fraction,
                                              p.max_iter, ctx.seed, ctx.device)
    acc = topk_accuracy(predict(xte), yte, (1, 5))
    info.update(chosen_l2=best, holdout_top1_by_l2={str(k): v for k, v in search.items()})
    return TaskOutput({f"{p.metric_prefix}_linear_top1": acc[1], f"{p.metric_prefix}_linear_top5": acc[5]}, info,
                      probe={"probe": "fast"})
