"""VOC07 linear SVM on frozen features (paper §8.4; the protocol of Goyal et al. 2019, as in VISSL).

VOC2007 trainval -> test; images resized to 256 on the short side, then to 224 x 224 (no crop); the
last stage's output average-pooled with AvgPool2d(6, stride 1) and flattened (8,192 values for a
ResNet-50), L2-normalised; one linear SVM per class (squared hinge, L2), cost chosen per class by
3-fold cross-validation on average precision among the listed costs (ties to the first), then refitted
on all of trainval; positive class weight 2. `difficult`-only images are negatives in training and
ignored at test; mAP is the mean of the per-class all-point APs.
"""
import warnings
from dataclasses import dataclass

import numpy as np
import torch.nn.functional as F

from backbones.features import PooledTrunk, extract_features
from core.cli import UserError
from core.progress import progress
from core.settings import setting
from datasets.catalog import SUBDIRS
from datasets.views import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from datasets.voc import read_voc_classification
from tasks.context import TaskOutput
from tasks.frozen import default_tap, family_transform, features_artifact, is_vit, tap_module
from tasks.metrics import voc_ap
from tasks.svm_solver import SharedFeatures, fit_linear_svms

GOYAL = ("Goyal et al. 2019 (fair_self_supervision_benchmark tools/svm/train_svm_kfold.py) and VISSL "
         "(vissl/utils/svm_utils/svm_trainer.py; configs/config/benchmark/linear_image_classification/voc07/"
         "eval_resnet_8gpu_transfer_voc07_svm.yaml)")


@dataclass(frozen=True)
class Voc07SvmProtocol:
    train_split: str = setting("trainval", "VOC2007 trainval (paper §8.4)")
    test_split: str = setting("test", "VOC2007 test (paper §8.4)")
    costs: tuple[float, ...] = setting((0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0),
                                       GOYAL + ": VISSL's costs_list (Goyal et al.'s code takes the list as an "
                                               "argument and fixes none for ResNet-50)")
    positive_weight: float = setting(2.0, GOYAL + ": class_weight {1: 2, -1: 1}")
    folds: int = setting(3, GOYAL + ": cross_val_score(cv=3, scoring='average_precision'), unshuffled "
                                    "StratifiedKFold; the cost of the best mean fold AP, ties to the first listed")
    max_iter: int = setting(2000, GOYAL + ": LinearSVC max_iter")
    tol: float = setting(1e-4, GOYAL + ": LinearSVC tol")
    solver: str = setting("fast", "fast: Newton-CG on the same primal for all classes and folds at once, cost "
                                "after cost, warm-started (tasks/svm_solver.py; agreement with sklearn: "
                                "bench/svm.py); "
                                "sklearn: LinearSVC (liblinear) one problem at a time, the reference")
    fast_tol: float = setting(1e-6, "numerical: the fast solver stops at |gradient| <= fast_tol |gradient at 0|; "
                                  "the agreement with sklearn is measured by bench/svm.py")
    resize: int = setting(256, GOYAL + ": Resize(256) on the short side (Goyal: scale 256)")
    square: int = setting(224, GOYAL + ": then Resize([224, 224]) without crop (Goyal: global_resize 224)")
    feature: str = setting("res5", GOYAL + ": res5: the last stage average-pooled by AvgPool2d(6, stride 1) and "
                                   "flattened (8,192-d for a ResNet-50); pool: the global average pool (2,048-d, "
                                   "VISSL's optional res5avg)", choices=("res5", "pool"))
    pool_kernel: int = setting(6, GOYAL + ": res5 AvgPool2d([6, 6], 1, 0)")
    pool_stride: int = setting(1, GOYAL + ": res5 AvgPool2d([6, 6], 1, 0)")
    batch_size: int = setting(128, "runtime setting of feature extraction; does not change the features")
    workers: int = setting(2, "runtime setting (data-loading processes); does not change results")
    skip_bad_images: bool = setting(False, "suite policy: an unreadable image stops the run unless this is set")
    save_features: bool = setting(False, "suite option: write the features the SVMs saw beside the record "
                                         "(<record>.features.npz; train_y / test_y hold VOC's 1 / 0 / -1 targets)")


DEMO = {}  # the demo VOC images (160 x 120) go through the real transform and feature layer


def _svm(cost, p):
    from sklearn.svm import LinearSVC  # scikit-learn loads in 1.4 s: imported where it is used, not by every command

    return LinearSVC(C=cost, class_weight={1: p.positive_weight, -1: 1.0}, penalty="l2", loss="squared_hinge",
                     dual=True, max_iter=p.max_iter, tol=p.tol, intercept_scaling=1.0, random_state=0)


def _cv_splits(y, p):
    """StratifiedKFold (unshuffled, as the reference) over the trainval labels of one class; [] if too few."""
    folds = min(p.folds, int((y > 0).sum()), int((y < 0).sum()))
    from sklearn.model_selection import StratifiedKFold

    return list(StratifiedKFold(n_splits=folds).split(y, y)) if folds >= 2 else []


def _best(scores, p):
    return max(p.costs, key=lambda c: (scores[c], -c))  # ties: the smaller cost


def choose_cost(x, y, p):
    """The cost with the best mean cross-validated AP, trained with LinearSVC; (cost, {cost: AP})."""
    from sklearn.metrics import average_precision_score

    split = _cv_splits(y, p)
    if not split:
        return None, {}
    scores = {}
    for cost in p.costs:
        aps = []
        for tr, va in split:
            clf = _svm(cost, p).fit(x[tr], y[tr])
            aps.append(average_precision_score(y[va] > 0, clf.decision_function(x[va])))
        scores[cost] = float(np.mean(aps))
    return _best(scores, p), scores


def _sklearn_scores(xtr, labels, xte, p):
    """Per class: (cost, test decision values) with LinearSVC, one problem at a time."""
    from sklearn.exceptions import ConvergenceWarning

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # liblinear at C=1000 rarely converges; as the reference
        for c, y in progress(labels.items(), "voc07 svm (sklearn, classes)", total=len(labels), unit="class"):
            cost, _ = choose_cost(xtr, y, p)
            if cost is not None:
                out[c] = cost, _svm(cost, p).fit(xtr, y).decision_function(xte)
    return out


def _fast_scores(xtr, labels, xte, p, device, shared=None):
    """The same protocol with the (class, fold) problems trained together by `fit_linear_svms`, one cost after
    the other in increasing order, each started from the solution of the previous cost (a warm start).
    shared: `SharedFeatures` of xtr from an earlier call (bench/svm.py runs the classes one at a time)."""
    from sklearn.metrics import average_precision_score

    shared = shared or SharedFeatures(xtr, device)
    problems = []  # (class, validation indices, train mask)
    for c, y in labels.items():
        for tr, va in _cv_splits(y, p):
            mask = np.zeros(len(y), bool)
            mask[tr] = True
            problems.append((c, va, mask))

    def fit(classes, costs, masks, init):
        w, b, _ = fit_linear_svms(shared, np.stack([labels[c] for c in classes]), costs, np.stack(masks),
                                  p.positive_weight, p.fast_tol, init=init)
        return np.concatenate([w, b[:, None]], 1)

    cv, solutions, init = {}, {}, None
    for cost in progress(sorted(p.costs) if problems else [], "voc07 svm (costs)", unit="cost"):
        init = fit([c for c, _, _ in problems], [cost] * len(problems), [m for _, _, m in problems], init)
        decisions = xtr @ init[:, :-1].T + init[:, -1]  # (n, problems): one product for every fold's validation
        for j, ((c, va, _), wb) in enumerate(zip(problems, init)):
            ap = average_precision_score(labels[c][va] > 0, decisions[va, j])
            cv.setdefault(c, {}).setdefault(cost, []).append(ap)
            solutions.setdefault((c, cost), []).append(wb)
    chosen = {c: _best({cost: np.mean(a) for cost, a in scores.items()}, p) for c, scores in cv.items()}
    if not chosen:
        return {}
    # the refit on all of trainval starts from the mean of its folds' solutions at the chosen cost
    start = np.stack([np.mean(solutions[c, cost], 0) for c, cost in chosen.items()])
    wb = fit(list(chosen), list(chosen.values()), [np.ones(len(xtr), bool)] * len(chosen), start)
    decisions = xte @ wb[:, :-1].T + wb[:, -1]
    return {c: (cost, decisions[:, j]) for j, (c, cost) in enumerate(chosen.items())}


def svm_protocol(xtr, ttr, xte, tte, classes, p, device="cpu", shared=None):
    """The whole protocol on L2-normalised features; ttr/tte: (n, classes) targets in {1, -1, 0 (difficult)}.
    Returns ({class: AP %}, {class: chosen cost}, [classes skipped for lack of positives]). shared: the
    fast solver's `SharedFeatures` of xtr, when the caller already has them."""
    if p.solver not in ("fast", "sklearn"):
        raise UserError(f"voc07_svm solver {p.solver!r} is unknown (available: fast, sklearn)")
    # difficult-only images are negatives in training and ignored at test
    labels = {c: np.where(ttr[:, c] > 0, 1, -1) for c in range(len(classes))
              if not np.isnan(voc_ap(np.zeros(len(tte)), tte[:, c]))}
    scores = _sklearn_scores(xtr, labels, xte, p) if p.solver == "sklearn" else \
        _fast_scores(xtr, labels, xte, p, device, shared)
    aps = {classes[c]: 100.0 * voc_ap(s, tte[:, c]) for c, (_, s) in scores.items()}
    chosen = {classes[c]: cost for c, (cost, _) in scores.items()}
    return aps, chosen, [name for c, name in enumerate(classes) if c not in scores]


def run(ctx, p: Voc07SvmProtocol) -> TaskOutput:
    devkit = ctx.data_root / SUBDIRS["voc"]
    splits = {name: read_voc_classification(devkit, 2007, getattr(p, f"{name}_split")) for name in ("train", "test")}
    mean, std = ctx.checkpoint.input_normalization or (IMAGENET_MEAN, IMAGENET_STD)
    transform = EvalTransform(p.resize, 0, tuple(mean), tuple(std), square=p.square)
    model, layer, tap = ctx.model, "pool", "avgpool"
    if is_vit(ctx):
        # Goyal's res5 map is a ResNet's: a ViT gives its CLS token after the final norm, on its own input
        transform, tap = family_transform(ctx, transform), default_tap(ctx)
        model, layer = tap_module(ctx, tap), tap
    elif p.feature == "res5":
        model = PooledTrunk(ctx.model, p.pool_kernel, p.pool_stride)
        layer = tap = f"res5-avgpool{p.pool_kernel}s{p.pool_stride}"
    feats, precision, cache = {}, None, {}
    for name, data in splits.items():
        x, _, extra = extract_features(model, ctx.checkpoint.cache_id, ctx.arch, data, transform,
                                       device=ctx.device, batch_size=p.batch_size, num_workers=p.workers,
                                       skip_bad_images=p.skip_bad_images, log=ctx.log, rank=ctx.rank,
                                       world=ctx.world, layer=layer)
        precision, cache[name] = extra["precision"], extra["cache"]
        if x is not None:
            feats[name] = (F.normalize(x, dim=1).numpy().astype(np.float64),
                           data.notes["targets"][extra["index"].numpy()])
    if ctx.rank != 0:
        return TaskOutput({})
    (xtr, ttr), (xte, tte) = feats["train"], feats["test"]
    aps, chosen, skipped = svm_protocol(xtr, ttr, xte, tte, splits["train"].classes, p, ctx.device)
    if not aps:
        raise UserError("no VOC class has positives in both trainval and test")
    info = {"train_size": len(xtr), "test_size": len(xte), "feature_dim": xtr.shape[1], "feature_layer": layer,
            "ap_by_class": aps, "chosen_cost": chosen, "classes_without_positives": skipped,
            "transform": transform.describe(), "processes": ctx.world, "precision": precision,
            "feature_cache": cache}
    artifacts = features_artifact(xtr, ttr, xte, tte) if p.save_features else {}
    return TaskOutput({"voc07_svm_map": float(np.mean(list(aps.values())))}, info, artifacts=artifacts,
                      probe={"probe": "svm:goyal", "feature": layer, "tap": tap})
