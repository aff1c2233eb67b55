#!/usr/bin/env python
"""VOC07 SVM: the fast solver against the scikit-learn reference, interleaved class by class in one run.

    python bench/svm.py                      # VOC07 size: 5,011 trainval x 2,048 features, 4,952 test, 20 classes
    python bench/svm.py --dim 8192           # Goyal et al.'s res5 features (2048 x 2 x 2)
    python bench/svm.py --classes 4          # the first 4 classes only (the reference takes long)

The features are synthetic, with VOC07's shape: the trainval/test sizes and per-class image counts
of VOC2007, non-negative like pooled ReLU features, multi-label, L2-normalised. Both solvers run the
whole protocol (3-fold cost choice over the 11 costs, refit, test AP). So that a change of machine load
hits both alike, every class is a sandwich: the reference on that class between two runs of the fast
solver, (a) on that class alone and (b) on all the classes at once as the task runs it (counted per
class: its time / the number of classes); which of the two goes first alternates. The speed ratios are
reported per class (their median) and in total. The fast solver's one-off preparation of the features
(`SharedFeatures`, with X X^T) is timed once and its time shared evenly among the classes in (a); the
runs in (b) prepare their own. The mAP of the two must agree within 0.2 points, with the same costs chosen.
"""
import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

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
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch CPU threads of the fast solver's products (default: torch's, as the task runs); "
                         "the reference, liblinear, runs on one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    xtr, ttr, xte, tte = voc_like_features(args.train, args.test, dim=args.dim, signal=args.signal)
    names = list(VOC_CLASSES[:args.classes])
    fast, sklearn = replace(Voc07SvmProtocol(), solver="fast"), replace(Voc07SvmProtocol(), solver="sklearn")
    print(f"features: trainval {xtr.shape}, test {xte.shape}, {len(names)} classes; fast solver on "
          f"{args.threads} thread(s)")

    def one_class(c, p, shared=None):
        return svm_protocol(xtr, ttr[:, [c]], xte, tte[:, [c]], [names[c]], p, shared=shared)

    def all_classes():
        return svm_protocol(xtr, ttr[:, :len(names)], xte, tte[:, :len(names)], names, fast)

    t_prep, shared = timed(lambda: SharedFeatures(xtr))
    t_prep += timed(shared.kernel)[0]
    print(f"fast solver's preparation of the features: {t_prep:.1f} s, shared among the classes in (a)\n")
    print("| class | sklearn s | (a) fast s, class alone | ratio | (b) fast s, all classes / n | ratio | "
          "AP sklearn | AP fast | cost sklearn | cost fast |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows, batched = [], []
    for c, name in enumerate(names):
        fast_alone = lambda: timed(lambda: one_class(c, fast, shared))  # noqa: E731
        fast_all = lambda: timed(all_classes)  # noqa: E731
        first, last = (fast_alone, fast_all) if c % 2 == 0 else (fast_all, fast_alone)
        out_first = first()
        ts, (aps, cs, _) = timed(lambda: one_class(c, sklearn))
        out_last = last()
        (ta, (apa, ca, _)), (tb, (apb, cb, _)) = (out_first, out_last) if c % 2 == 0 else (out_last, out_first)
        batched.append((tb, apb, cb))
        if name not in aps:
            print(f"| {name} | skipped: no positives in trainval or test | | | | | | | | |")
            continue
        ta += t_prep / len(names)
        tb /= len(names)
        rows.append((name, ts, ta, tb, aps[name], apa[name], cs[name], ca[name]))
        print(f"| {name} | {ts:.1f} | {ta:.2f} | {ts / ta:.1f}x | {tb:.2f} | {ts / tb:.1f}x | {aps[name]:.3f} | "
              f"{apa[name]:.3f} | {cs[name]:g} | {ca[name]:g} |", flush=True)
    _, ts, ta, tb, aps, apa, cs, ca = zip(*rows)
    same = sum(a == b for a, b in zip(cs, ca))
    print(f"\nsklearn {sum(ts):.1f} s; (a) fast, class by class {sum(ta):.1f} s: {sum(ts) / sum(ta):.1f}x in total, "
          f"median per-class ratio {statistics.median(s / a for s, a in zip(ts, ta)):.1f}x")
    t_all = [t for t, _, _ in batched]
    print(f"(b) fast, all {len(names)} classes at once: median {statistics.median(t_all):.1f} s of {len(t_all)} runs "
          f"(range {min(t_all):.1f}-{max(t_all):.1f}): {sum(ts) / statistics.median(t_all):.1f}x in total, median "
          f"per-class ratio {statistics.median(s / b for s, b in zip(ts, tb)):.1f}x")
    print(f"mAP sklearn {np.mean(aps):.3f}, fast {np.mean(apa):.3f} (difference {np.mean(apa) - np.mean(aps):+.3f}); "
          f"largest per-class AP difference {max(abs(a - b) for a, b in zip(aps, apa)):.3f}; same cost chosen for "
          f"{same} of {len(rows)} classes")
    # (a) and (b) solve the same problems to the same gradient tolerance, alone or together: equal up to it
    shown = [r[0] for r in rows]
    first_ap, first_cost = batched[0][1], batched[0][2]
    across = max(abs(ap_b[n] - first_ap[n]) for _, ap_b, _ in batched for n in shown)
    vs_alone = max(abs(first_ap[n] - a) for n, a in zip(shown, apa))
    costs = sum(first_cost[n] == c for n, c in zip(shown, ca))
    print(f"(b) against (a): largest per-class AP difference {vs_alone:.4f}, same cost for {costs} of {len(shown)} "
          f"classes; (b) over its {len(batched)} runs: largest AP difference {across:.4f}, costs "
          f"{'identical' if all(cost_b == first_cost for _, _, cost_b in batched) else 'not identical'}")


if __name__ == "__main__":
    main()
