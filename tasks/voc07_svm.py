"""VOC07 linear SVM on frozen features (paper §8.4; the protocol of Goyal et al. 2019, as in VISSL).

VOC2007 trainval -> test; pooled last-stage features, L2-normalised; one linear SVM per class
(squared hinge, L2), cost chosen per class by 3-fold cross-validation on average precision among
the listed costs, then refitted on all of trainval; positive class weight 2. `difficult`-only images
are negatives in training and ignored at test; mAP is the mean of the per-class VOC APs.
"""
import warnings
from dataclasses import dataclass

import numpy as np
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC
from tqdm import tqdm

from evaluate.checkpoints import IMAGENET_MEAN, IMAGENET_STD
from evaluate.common import UserError
from evaluate.features import EvalTransform, extract_features
from tasks.datasets import SUBDIRS
from tasks.datasets.voc import read_voc_classification
from tasks.metrics import voc_ap
from tasks.protocol import param

GOYAL = "Goyal et al. 2019 (fair_self_supervision_benchmark), VISSL's voc07 SVM"


@dataclass(frozen=True)
class Voc07SvmProtocol:
    train_split: str = param("trainval", "VOC2007 trainval (paper §8.4)")
    test_split: str = param("test", "VOC2007 test (paper §8.4)")
    costs: tuple[float, ...] = param((0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0), GOYAL)
    positive_weight: float = param(2.0, GOYAL + ": class_weight {1: 2, -1: 1}")
    folds: int = param(3, GOYAL + ": 3-fold cross-validation on average precision")
    max_iter: int = param(2000, GOYAL + ": LinearSVC max_iter")
    tol: float = param(1e-4, GOYAL + ": LinearSVC tol")
    solver: str = param("sklearn", "sklearn: LinearSVC (liblinear), the reference protocol; 'fast' comes with the "
                                   "classification issue")
    resize: int = param(256, "torchvision's reference evaluation transform (resize 256, centre crop 224)")
    crop: int = param(224, "torchvision's reference evaluation transform")
    batch_size: int = param(128, "runtime setting of feature extraction; does not change the features")
    workers: int = param(2, "runtime setting (data-loading processes); does not change results")
    skip_bad_images: bool = param(False, "suite policy: an unreadable image stops the run unless this is set")


DEMO = {"resize": 96, "crop": 96}  # the demo VOC images are 160 x 120


def _svm(cost, p):
    return LinearSVC(C=cost, class_weight={1: p.positive_weight, -1: 1.0}, penalty="l2", loss="squared_hinge",
                     dual=True, max_iter=p.max_iter, tol=p.tol, intercept_scaling=1.0)


def choose_cost(x, y, p):
    """The cost with the best mean cross-validated AP (ties: the smaller cost); (cost, {cost: AP})."""
    folds = min(p.folds, int((y > 0).sum()), int((y < 0).sum()))
    if folds < 2:
        return None, {}
    scores = {}
    split = list(StratifiedKFold(n_splits=folds).split(x, y))
    for cost in p.costs:
        aps = []
        for tr, va in split:
            clf = _svm(cost, p).fit(x[tr], y[tr])
            aps.append(average_precision_score(y[va] > 0, clf.decision_function(x[va])))
        scores[cost] = float(np.mean(aps))
    return max(p.costs, key=lambda c: (scores[c], -c)), scores


def run(ctx, p: Voc07SvmProtocol):
    if p.solver != "sklearn":
        raise UserError(f"voc07_svm solver {p.solver!r} is not implemented yet (available: sklearn)")
    devkit = ctx.data_root / SUBDIRS["voc"]
    splits = {name: read_voc_classification(devkit, 2007, getattr(p, f"{name}_split")) for name in ("train", "test")}
    mean, std = ctx.checkpoint.input_normalization or (IMAGENET_MEAN, IMAGENET_STD)
    transform = EvalTransform(p.resize, p.crop, tuple(mean), tuple(std))
    feats = {}
    for name, data in splits.items():
        x, _, extra = extract_features(ctx.model, ctx.checkpoint.cache_id, ctx.arch, data, transform,
                                       device=ctx.device, batch_size=p.batch_size, num_workers=p.workers,
                                       skip_bad_images=p.skip_bad_images, log=ctx.log)
        feats[name] = (F.normalize(x, dim=1).numpy().astype(np.float64),
                       data.notes["targets"][extra["index"].numpy()])
    (xtr, ttr), (xte, tte) = feats["train"], feats["test"]
    aps, chosen, skipped = {}, {}, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # liblinear at C=1000 rarely converges; as the reference
        for c, name in enumerate(tqdm(splits["train"].classes, desc="voc07 svm", leave=False)):
            y = np.where(ttr[:, c] > 0, 1, -1)  # difficult-only images are negatives in training
            cost, _ = choose_cost(xtr, y, p)
            if cost is None or np.isnan(voc_ap(np.zeros(len(tte)), tte[:, c])):
                skipped.append(name)
                continue
            clf = _svm(cost, p).fit(xtr, y)
            aps[name] = 100.0 * voc_ap(clf.decision_function(xte), tte[:, c])
            chosen[name] = cost
    if not aps:
        raise UserError("no VOC class has positives in both trainval and test")
    info = {"train_size": len(xtr), "test_size": len(xte), "ap_by_class": aps, "chosen_cost": chosen,
            "classes_without_positives": skipped, "transform": transform.describe()}
    return {"voc07_svm_map": float(np.mean(list(aps.values())))}, info
