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

from core import distributed
from core.cli import UserError
from core.progress import progress
from core.settings import setting
from datasets.views import EvalTransform
from tasks import linear_sgd
from tasks.classifier_training import SCHEDULES
from tasks.context import TaskOutput
from tasks.frozen import (FrozenFeatureProtocol, TapCheckpoint, default_tap, family_transform, features_artifact,
                          input_normalization, is_vit, linear_taps, read_splits, tap_module, train_test_features)
from tasks.metrics import topk_accuracy


SGD_SOURCE = ("protocol=sgd: BYOL's linear evaluation on ImageNet (Grill et al. 2020, App. C.1; deepmind-research "
              "byol/configs/eval.py: SGD, Nesterov momentum 0.9, no weight decay, 80 epochs, batch 1024, base LR 0.2 "
              "x batch / 256 with cosine decay, random resized crop and flip, frozen BatchNorm)")
WMSE_SOURCE = ("protocol=wmse: W-MSE's linear evaluation (htdt/self-supervised eval/sgd.py eval_sgd): nn.Linear on "
               "precomputed test-transform features, Adam LR 1e-2 decayed exponentially (per epoch) towards 1e-6 "
               "over 500 epochs, weight decay 5e-6, batch 1000, cross-entropy; Table 1's ResNet-18 rows are W-MSE's")


@dataclass(frozen=True)
class LinearProtocol(FrozenFeatureProtocol):
    protocol: str = setting("fast", "fast: cached features + L-BFGS logistic regression (CLIP, App. A.3); sgd: SGD "
                                    "with augmentation (the sgd_* values, BYOL's protocol); wmse: W-MSE's Adam probe "
                                    "(the wmse_* values, Table 1)", choices=("fast", "sgd", "wmse"))
    l2_grid: tuple[float, ...] = setting((1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
                                         "log-spaced sweep of the L2 strength, as CLIP's linear probes sweep it")
    holdout_fraction: float = setting(0.2, "share of each training class held out to choose the L2 strength")
    max_iter: int = setting(500, "L-BFGS iterations; enough for convergence at these sizes (loss change < 1e-7)")
    sgd_epochs: int = setting(80, SGD_SOURCE)
    sgd_lr: float = setting(0.8, SGD_SOURCE + ": 0.2 x 1024 / 256 (the paper sweeps 0.05-0.4 on a held-out split)")
    sgd_batch_size: int = setting(1024, SGD_SOURCE)
    sgd_momentum: float = setting(0.9, SGD_SOURCE)
    sgd_nesterov: bool = setting(True, SGD_SOURCE)
    sgd_weight_decay: float = setting(0.0, SGD_SOURCE)
    sgd_schedule: str = setting("cosine", SGD_SOURCE, choices=SCHEDULES)
    sgd_head_batchnorm: bool = setting(False, SGD_SOURCE + ": a plain linear layer")
    wmse_epochs: int = setting(500, WMSE_SOURCE)
    wmse_lr: float = setting(1e-2, WMSE_SOURCE)
    wmse_lr_end: float = setting(1e-6, WMSE_SOURCE + ": gamma = (lr_end / lr) ** (1 / epochs), stepped per epoch")
    wmse_weight_decay: float = setting(5e-6, WMSE_SOURCE + " (Adam's L2 term)")
    wmse_batch_size: int = setting(1000, WMSE_SOURCE + "; the remainder of the training set is left out (W-MSE's "
                                                       "loader drops it: drop_last=True)")


# Demo: L-BFGS for 100 iterations; protocol=sgd over 3 epochs at batch 32 on the small demo trees (like the demo SGD
# probes); protocol=wmse with batches of 60 (the demo train splits hold 180-360 images) and 100 epochs.
DEMO = dict(max_iter=100, sgd_epochs=3, sgd_batch_size=32, wmse_batch_size=60, wmse_epochs=100)


def train_linear_wmse(xtr, ytr, num_classes, p: LinearProtocol, seed: int, device="cpu"):
    """W-MSE's probe on precomputed features (eval/sgd.py eval_sgd), with its random calls in its order: after
    torch.manual_seed(seed), PyTorch's default initialisation of nn.Linear, then per epoch one
    torch.randperm(len(x_train)) cut into batches. W-MSE's `.view(-1, 1000)` needs a multiple of the batch size;
    here a remainder is left out of each epoch (the rows past the last whole batch of that epoch's
    permutation). Returns (the trained nn.Linear, per-epoch history, training rows used per epoch)."""
    n = len(xtr) - len(xtr) % p.wmse_batch_size
    if n == 0:
        raise UserError(f"wmse_batch_size {p.wmse_batch_size} exceeds the {len(xtr)} training images")
    x, y = xtr.float().to(device), ytr.to(device)
    history = []
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        clf = torch.nn.Linear(x.shape[1], num_classes).to(device)
        opt = torch.optim.Adam(clf.parameters(), lr=p.wmse_lr, weight_decay=p.wmse_weight_decay)
        gamma = (p.wmse_lr_end / p.wmse_lr) ** (1 / p.wmse_epochs)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
        for epoch in progress(range(p.wmse_epochs), "linear (wmse)", unit="epoch"):
            lr, total = opt.param_groups[0]["lr"], torch.zeros((), device=device)
            for batch in torch.randperm(len(x))[:n].view(-1, p.wmse_batch_size):
                batch = batch.to(device)
                loss = F.cross_entropy(clf(x[batch]), y[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.detach()
            scheduler.step()
            history.append({"epoch": epoch + 1, "lr": lr, "train_loss": total.item() * p.wmse_batch_size / n})
    return clf, history, n


class FeatureBank:
    """Training features where the L-BFGS solver reads them, optionally standardised by (x - mean) / std on the way.

    On a device with room for them they are copied there once (a block at a time, into one tensor) and every
    evaluation reads them in place. Otherwise (`torch.cuda.mem_get_info`: less free memory than 1.5 times the
    bank, the rest being logits and gradients), or when `block_rows` is given, they stay on the host (pinned for
    CUDA) and each evaluation copies them `block_rows` rows at a time: the loss and gradient are sums over
    blocks, so only the time changes."""

    COPY_ROWS = 65536  # rows standardised per step while copying: bounds the temporary memory

    def __init__(self, x, device="cpu", mean=None, std=None, block_rows=None, log=print):
        self.device = torch.device(device)
        self.dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.shape = x.shape
        self.mean = None if mean is None else mean.to(self.device, self.dtype)
        self.std = None if std is None else std.to(self.device, self.dtype)
        nbytes = x.shape[0] * x.shape[1] * self.dtype.itemsize
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        if block_rows is None and free is not None and 1.5 * nbytes > free:
            block_rows = max(1, int(free // 4 // (x.shape[1] * self.dtype.itemsize)))
            log(f"  the feature bank ({nbytes / 2 ** 30:.1f} GB) does not fit on {self.device} "
                f"({free / 2 ** 30:.1f} GB free): streamed in blocks of {block_rows} rows at every L-BFGS evaluation")
        self.block_rows = block_rows
        if block_rows is not None:
            self.host = x.to(self.dtype)
            if self.device.type == "cuda":
                self.host = self.host.pin_memory()
        else:
            self.data = torch.empty(x.shape, dtype=self.dtype, device=self.device)
            for start in range(0, len(x), self.COPY_ROWS):
                self.data[start:start + self.COPY_ROWS] = self.prepare(x[start:start + self.COPY_ROWS])

    def __len__(self):
        return self.shape[0]

    def prepare(self, x):
        x = x.to(self.device, self.dtype, non_blocking=True)
        return x if self.mean is None else (x - self.mean) / self.std

    def blocks(self):
        """(first row, rows on the device) over the bank."""
        if self.block_rows is None:
            yield 0, self.data
            return
        for start in range(0, len(self), self.block_rows):
            yield start, self.prepare(self.host[start:start + self.block_rows])

    def logits(self, w, b, rows=None):
        """x @ w + b of the `rows` (a boolean mask; all by default), on the CPU."""
        out = []
        with torch.no_grad():
            for start, xb in self.blocks():
                z = xb @ w + b
                out.append((z if rows is None else z[rows[start:start + len(xb)]]).cpu())
        return torch.cat(out)


def fit_logistic_regression(x, y, num_classes, l2, max_iter=500, rows=None, bias=True):
    """Minimise mean cross-entropy + (l2 / 2) * ||W||^2 (bias unpenalised; none when `bias` is False) over the
    `rows` of `x` (a FeatureBank or a tensor; `rows` a boolean mask, all rows by default); returns (W (D, C),
    b (C,))."""
    bank = x if isinstance(x, FeatureBank) else FeatureBank(x, x.device)
    device, dtype = bank.device, bank.dtype
    y = y.to(device)
    weight = torch.ones(len(bank), dtype=dtype, device=device) if rows is None else rows.to(device, dtype)
    weight = weight / weight.sum()
    w = torch.zeros(bank.shape[1], num_classes, dtype=dtype, device=device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=dtype, device=device, requires_grad=bias)
    # Solver numerics (not protocol): tolerances tight enough that max_iter decides when to stop.
    opt = torch.optim.LBFGS([w, b] if bias else [w], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        total = torch.zeros((), dtype=dtype, device=device)
        for start, xb in bank.blocks():  # gradients add up over the blocks
            end = start + len(xb)
            loss = (F.cross_entropy(xb @ w + b, y[start:end], reduction="none") * weight[start:end]).sum()
            loss.backward()
            total += loss.detach()
        penalty = 0.5 * l2 * (w * w).sum()
        penalty.backward()
        return total + penalty.detach()

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


def standardised_bank(xtr, device="cpu", block_rows=None, log=print) -> FeatureBank:
    """The training features standardised with their own mean/std (training statistics only), on `device`."""
    return FeatureBank(xtr, device, xtr.mean(0), xtr.std(0).clamp_min(1e-6), block_rows, log)


def holdout_search(bank: FeatureBank, ytr, num_classes, grid, holdout_fraction, max_iter, seed, bias=True) -> dict:
    """{L2 strength: top-1 on a stratified held-out part of the training set, fitted on the rest}."""
    held = torch.from_numpy(stratified_holdout(ytr.numpy(), holdout_fraction, seed))
    search = {}
    for l2 in grid:
        w, b = fit_logistic_regression(bank, ytr, num_classes, l2, max_iter, rows=~held, bias=bias)
        search[l2] = topk_accuracy(bank.logits(w, b, held.to(bank.device)), ytr[held], (1,))[1]
    return search


def best_l2(search: dict) -> float:
    return max(search, key=lambda l2: (search[l2], l2))  # ties go to the stronger regulariser


def refit(bank: FeatureBank, ytr, num_classes, l2, max_iter, bias=True):
    """The classifier fitted on every training row; returns predict(x) -> logits on the CPU."""
    w, b = fit_logistic_regression(bank, ytr, num_classes, l2, max_iter, bias=bias)
    return lambda x: FeatureBank(x, bank.device, bank.mean, bank.std, bank.block_rows).logits(w, b)


def train_linear_fast(xtr, ytr, num_classes, grid, holdout_fraction, max_iter, seed, device="cpu", block_rows=None,
                      log=print):
    """Choose the L2 strength on a held-out part of the training set, refit on all of it. The standardised
    training features go to `device` once (`FeatureBank`; streamed in blocks when they do not fit there)."""
    bank = standardised_bank(xtr, device, block_rows, log)
    search = holdout_search(bank, ytr, num_classes, grid, holdout_fraction, max_iter, seed)
    best = best_l2(search)
    return refit(bank, ytr, num_classes, best, max_iter), best, search


def fast_probe(ctx, p: LinearProtocol, taps, splits):
    """The fast probe over the release's taps: for each, its features and the held-out L2 search; the (tap, L2)
    with the best held-out top-1 (ties: the first tap listed, the stronger L2) is refitted on all training
    images. One tap for most releases; DINOv2's grid over blocks x mean-pooled patch tokens (eval/linear.py,
    chosen there on val; here on the held-out part of train, never on test). Rank 0 returns (scores on test,
    info, chosen tap, head, the chosen tap's (train x, train y, test x, test y)); the other ranks None after the
    extractions."""
    best, by_tap = None, {}
    for i, (tap, head) in enumerate(taps):
        (xtr, ytr), (xte, yte), info = train_test_features(ctx, p, tap=tap, splits=splits)
        if ctx.rank != 0:
            continue
        torch.manual_seed(ctx.seed)
        bank = standardised_bank(xtr, ctx.device, log=ctx.log)
        search = holdout_search(bank, ytr, p.num_classes, p.l2_grid, p.holdout_fraction, p.max_iter, ctx.seed)
        by_tap[tap] = {str(k): v for k, v in search.items()}
        l2 = best_l2(search)
        if best is None or (search[l2], -i) > best[0]:
            best = ((search[l2], -i), tap, head, l2, bank, (xtr, ytr, xte, yte), info)
        del bank
    if ctx.rank != 0:
        return None
    _, tap, head, l2, bank, features, info = best
    scores = refit(bank, features[1], p.num_classes, l2, p.max_iter)(features[2])
    info.update(chosen_l2=l2, holdout_top1_by_l2=by_tap[tap], head=head)
    if len(taps) > 1:
        info["holdout_top1_by_tap_and_l2"] = by_tap
    if head == "bn_linear":
        info["head_note"] = ("BatchNorm1d without affine then Linear (MAE main_linprobe.py): the fast probe "
                             "standardises every tap with the training mean/std, that BatchNorm over the full batch")
    return scores, info, tap, head, features


def sgd_protocol(p: LinearProtocol, transform=None, head="linear") -> linear_sgd.LinearSgdProtocol:
    """The SGD probe that `protocol=sgd` trains: the dataset values of `p`, its sgd_* values, the family's input
    `transform` when given (a ViT's), and a BatchNorm head without affine for the release's 'bn_linear'."""
    shared = {f.name: getattr(p, f.name) for f in dataclasses.fields(FrozenFeatureProtocol)}
    if transform is not None:
        shared.update(resize=transform.resize, crop=transform.crop, interpolation=transform.interpolation,
                      mean=tuple(transform.mean), std=tuple(transform.std))
    return linear_sgd.LinearSgdProtocol(**shared, protocol="byol", epochs=p.sgd_epochs, lr=p.sgd_lr,
                                        train_batch_size=p.sgd_batch_size, momentum=p.sgd_momentum,
                                        nesterov=p.sgd_nesterov, weight_decay=p.sgd_weight_decay,
                                        schedule=p.sgd_schedule,
                                        head_batchnorm=p.sgd_head_batchnorm or head == "bn_linear")


def sgd_probe(ctx, p: LinearProtocol, taps) -> TaskOutput:
    """protocol=sgd on the release's tap. With several taps (DINOv2) the tap is the fast probe's held-out choice:
    DINOv2 chooses it with the linear heads it trains, and an SGD probe per tap would cost len(taps) runs."""
    tap, head = taps[0]
    choice = {}
    if len(taps) > 1:
        fast = fast_probe(ctx, p, taps, read_splits(ctx, p))
        if ctx.rank == 0:
            _, info, tap, head, _ = fast
            choice = {"tap_chosen_by": "fast probe, held-out part of train",
                      "holdout_top1_by_tap_and_l2": info["holdout_top1_by_tap_and_l2"]}
        tap, head = distributed.broadcast_object((tap, head))
    mean, std = input_normalization(ctx, p, {})
    transform = family_transform(ctx, EvalTransform(p.resize, p.crop, mean, std, p.interpolation))
    task_name = f"linear_{p.metric_prefix}_sgd"
    if tap != default_tap(ctx):
        ctx = dataclasses.replace(ctx, model=tap_module(ctx, tap), checkpoint=TapCheckpoint(ctx.checkpoint, tap))
        task_name += f"_{tap}"
    out = linear_sgd.run(ctx, sgd_protocol(p, transform if is_vit(ctx) else None, head), task_name=task_name)
    out.info.update(tap=tap, head=head, **choice)
    out.probe["tap"] = tap
    return out


def run(ctx, p: LinearProtocol) -> TaskOutput:
    taps = linear_taps(ctx)
    if p.protocol == "sgd":
        return sgd_probe(ctx, p, taps)
    splits = read_splits(ctx, p)
    if p.protocol == "wmse":
        (xtr, ytr), (xte, yte), info = train_test_features(ctx, p, splits=splits)
        if ctx.rank != 0:
            return TaskOutput({})
        clf, history, used = train_linear_wmse(xtr, ytr, p.num_classes, p, ctx.seed, ctx.device)
        with torch.no_grad():
            scores = clf(xte.to(ctx.device)).cpu()
        info.update(history=history, train_rows_used=used)
        tap = info["tap"]
    else:
        fast = fast_probe(ctx, p, taps, splits)
        if ctx.rank != 0:
            return TaskOutput({})
        scores, info, tap, _, (xtr, ytr, xte, yte) = fast
    acc = topk_accuracy(scores, yte, (1, 5))
    artifacts = features_artifact(xtr, ytr, xte, yte) if p.save_features else {}  # the chosen tap's features
    return TaskOutput({f"{p.metric_prefix}_linear_top1": acc[1], f"{p.metric_prefix}_linear_top5": acc[5]}, info,
                      artifacts=artifacts, probe={"probe": f"linear:{p.protocol}", "tap": tap})


# ---- semi-supervised subsets, frozen ViT features ----------------------------------------------------------
IBOT_LOGREG = ("iBOT evaluation/eval_logistic_regression.py (MSN's protocol): the CLS token after the final norm "
               "(n_last_blocks 1, avgpool 0), L2-normalised, multiclass logistic regression with an L2 penalty and no "
               "intercept (cyanure, fit_intercept=False)")


@dataclass(frozen=True)
class SubsetLogisticRegression:
    """The 1% / 10% evaluation of a frozen ViT by logistic regression on its features (iBOT, MSN)."""

    lambdas: tuple[float, ...] = setting((0.01, 0.1, 1.0), IBOT_LOGREG + ": --lr_lambd 0.01 0.1 1 (iBOT reports each "
                                                          "on val; here one is chosen on held-out training images)")
    holdout_fraction: float = setting(0.2, "share of each class of the subset held out to choose the L2 strength")
    max_iter: int = setting(500, "L-BFGS iterations on the objective of cyanure's (mean loss + lambda / 2 "
                                 "||W||^2)")


def subset_logistic_regression(ctx, p: FrozenFeatureProtocol, train, test, lr: SubsetLogisticRegression = None):
    """Top-1/top-5 on `test` of the logistic regression on the frozen features of the `train` subset (SimCLR's
    1% / 10% lists), its L2 strength chosen on held-out images of the subset. Returns (accuracy {1, 5}, info);
    (None, info) on ranks other than 0. For tasks/semisup.py's frozen ViT protocol."""
    lr = lr or SubsetLogisticRegression()
    (xtr, ytr), (xte, yte), info = train_test_features(ctx, p, splits={"train": train, "test": test})
    if ctx.rank != 0:
        return None, info
    bank = FeatureBank(F.normalize(xtr, dim=1), ctx.device, log=ctx.log)
    search = holdout_search(bank, ytr, p.num_classes, lr.lambdas, lr.holdout_fraction, lr.max_iter, ctx.seed,
                            bias=False)
    best = best_l2(search)
    predict = refit(bank, ytr, p.num_classes, best, lr.max_iter, bias=False)
    info.update(chosen_lambda=best, holdout_top1_by_lambda={str(k): v for k, v in search.items()},
                classifier="logistic regression on L2-normalised frozen features, no intercept (iBOT / MSN)")
    return topk_accuracy(predict(F.normalize(xte, dim=1)), yte, (1, 5)), info
