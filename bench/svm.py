#!/usr/bin/env python
"""VOC07 SVM: the fast solver against the scikit-learn reference, interleaved class by class in one run.

    python bench/svm.py                      # VOC07 size: 5,011 trainval x 2,048 features, 4,952 test, 20 classes
    python bench/svm.py --dim 8192           # Goyal et al.'s res5 features (2048 x 2 x 2)
    python bench/svm.py --classes 4          # the first 4 classes only (the reference takes long)

The features are synthetic, with VOC07's shape: the trainval/test sizes and per-class image counts
of VOC2007, non-negative like pooled ReLU features, multi-label, L2-normalised. Both solvers run the
whole protocol (3-fold cost choice over the 11 costs, refit, test AP). So that a change of machine load
hits both alike, they alternate class by class (which one goes first alternates too), and the median
of the per-class speed ratios is reported beside the ratio of the totals. The fast solver's one-off
preparation of the features (`SharedFeatures`) is timed once and its time shared evenly among the
classes. The fast protocol is also timed on all classes at once, as the task runs it, before and after
the interleaved classes. The mAP of the two must agree within 0.2 points, with the same costs chosen.
"""
import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from datasets.voc import VOC_CLASSES  # noqa: E402
from tasks.svm_solver import SharedFeatures  # noqa: E402
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


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--train", type=int, default=5011)
    ap.add_argument("--test", type=int, default=4952)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--signal", type=float, default=0.15, help="class signal strength of the synthetic features")
    args = ap.parse_args()
    xtr, ttr, xte, tte = voc_like_features(args.train, args.test, dim=args.dim, signal=args.signal)
    names = list(VOC_CLASSES[:args.classes])
    fast, sklearn = replace(Voc07SvmProtocol(), solver="fast"), replace(Voc07SvmProtocol(), solver="sklearn")
    print(f"features: trainval {xtr.shape}, test {xte.shape}, {len(names)} classes")

    def batched():
        return svm_protocol(xtr, ttr[:, :len(names)], xte, tte[:, :len(names)], names, fast)

    t_batched = [timed(batched)[0]]
    print(f"fast protocol on all {len(names)} classes at once: {t_batched[0]:.1f} s", flush=True)
    t_prep, shared = timed(lambda: SharedFeatures(xtr))
    print(f"fast solver's preparation of the features: {t_prep:.1f} s, shared among the classes below\n")
    print("| class | sklearn s | fast s | ratio | AP sklearn | AP fast | cost sklearn | cost fast |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for c, name in enumerate(names):
        def run(p):
            return timed(lambda: svm_protocol(xtr, ttr[:, [c]], xte, tte[:, [c]], [name], p, shared=shared))

        if c % 2 == 0:
            (tf, (apf, cf, _)), (ts, (aps, cs, _)) = run(fast), run(sklearn)
        else:
            (ts, (aps, cs, _)), (tf, (apf, cf, _)) = run(sklearn), run(fast)
        if name not in aps:
            print(f"| {name} | skipped: no positives in trainval or test | | | | | | |")
            continue
        tf += t_prep / len(names)
        rows.append((name, ts, tf, aps[name], apf[name], cs[name], cf[name]))
        print(f"| {name} | {ts:.1f} | {tf:.2f} | {ts / tf:.1f}x | {aps[name]:.3f} | {apf[name]:.3f} | {cs[name]:g} | "
              f"{cf[name]:g} |", flush=True)
    t_batched.append(timed(batched)[0])
    _, ts, tf, aps, apf, cs, cf = zip(*rows)
    same = sum(a == b for a, b in zip(cs, cf))
    print(f"\nsklearn {sum(ts):.1f} s, fast {sum(tf):.1f} s (class by class): {sum(ts) / sum(tf):.1f}x in total, "
          f"median per-class ratio {statistics.median(s / f for s, f in zip(ts, tf)):.1f}x")
    print(f"fast protocol on all classes at once: {' and '.join(f'{t:.1f}' for t in t_batched)} s (before and "
          f"after), {sum(ts) / statistics.mean(t_batched):.1f}x the sklearn total")
    print(f"mAP sklearn {np.mean(aps):.3f}, fast {np.mean(apf):.3f} (difference {np.mean(apf) - np.mean(aps):+.3f}); "
          f"largest per-class AP difference {max(abs(a - b) for a, b in zip(aps, apf)):.3f}; same cost chosen for "
          f"{same} of {len(rows)} classes")


if __name__ == "__main__":
    main()
