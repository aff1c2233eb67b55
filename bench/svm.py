#!/usr/bin/env python
"""VOC07 SVM: the fast solver against the scikit-learn reference, side by side in one run.

    python bench/svm.py                 # real size: 5,011 trainval x 2,048 features, 4,952 test, 20 classes
    python bench/svm.py --classes 4     # the first 4 classes only (the reference takes long)

The features are synthetic, with VOC07's shape: the trainval/test sizes and per-class image counts
of VOC2007, non-negative like pooled ReLU features, multi-label, L2-normalised. Both solvers run the
whole protocol (3-fold cost choice over the 11 costs, refit, test AP); the result is the speed ratio
and the mAP difference, which must stay within 0.2 points.
"""
import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from datasets.voc import VOC_CLASSES  # noqa: E402
from tasks.voc07_svm import Voc07SvmProtocol, svm_protocol  # noqa: E402

# VOC2007 trainval images per class (the dataset's published statistics), used as class frequencies
VOC07_TRAINVAL_IMAGES = (238, 243, 330, 181, 244, 186, 713, 337, 445, 141, 200, 421, 287, 245, 2008, 245, 96, 229,
                         261, 256)


def voc_like_features(n_train=5011, n_test=4952, dim=2048, signal=0.15, seed=0):
    """(xtr, ttr, xte, tte): L2-normalised non-negative features, targets in {1, -1, 0} like VOC's."""
    rng = np.random.default_rng(seed)
    freq = np.array(VOC07_TRAINVAL_IMAGES) / 5011
    prototypes = np.maximum(rng.normal(size=(len(freq), dim)), 0) * (rng.random((len(freq), dim)) < 0.2)
    shared = np.abs(rng.normal(size=dim))           # pooled ReLU features share a large common part
    mixing = rng.normal(size=(64, dim)) / 8         # low-rank nuisance (pose, background, ...)

    def draw(n):
        labels = rng.random((n, len(freq))) < freq
        x = shared + signal * labels @ prototypes * rng.uniform(0.3, 1.5, (n, 1)) + rng.normal(size=(n, 64)) @ mixing
        x = np.maximum(x + 0.3 * rng.normal(size=(n, dim)), 0)
        targets = np.where(labels, 1, -1)
        targets[labels & (rng.random(labels.shape) < 0.05)] = 0  # a few difficult-only images
        return x / np.linalg.norm(x, axis=1, keepdims=True), targets

    return (*draw(n_train), *draw(n_test))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--train", type=int, default=5011)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--signal", type=float, default=0.15, help="class signal strength of the synthetic features")
    args = ap.parse_args()
    xtr, ttr, xte, tte = voc_like_features(args.train, dim=args.dim, signal=args.signal)
    ttr, tte, classes = ttr[:, :args.classes], tte[:, :args.classes], list(VOC_CLASSES[:args.classes])
    print(f"features: trainval {xtr.shape}, test {xte.shape}, {len(classes)} classes")
    print("| solver | seconds | mAP | costs chosen |")
    print("| --- | --- | --- | --- |")
    results = {}
    for solver in ("fast", "sklearn"):
        t = time.perf_counter()
        aps, chosen, _ = svm_protocol(xtr, ttr, xte, tte, classes, replace(Voc07SvmProtocol(), solver=solver))
        results[solver] = time.perf_counter() - t, np.mean(list(aps.values())), aps
        print(f"| {solver} | {results[solver][0]:.1f} | {results[solver][1]:.2f} | {sorted(chosen.values())} |",
              flush=True)
    (tf, mf, af), (ts, ms, as_) = results["fast"], results["sklearn"]
    print(f"speed-up {ts / tf:.1f}x; mAP difference {mf - ms:+.3f} points; "
          f"largest per-class AP difference {max(abs(af[c] - as_[c]) for c in af):.3f}")


if __name__ == "__main__":
    main()
