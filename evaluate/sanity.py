"""`--sanity`: before the long tasks, a few minutes that catch a wrong or empty checkpoint.

A weighted kNN (NPID's rule, paper §8.3: cosine on L2-normalised features, k = 20, votes exp(sim / 0.07))
on a small fixed subset of the first classification task's data, for the checkpoint and for a random
encoder of the same architecture; a checkpoint that is no better than the random encoder (within
`MARGIN` points, the noise of a 500-image test subset) is warned about. A warning, not an error: some
encoders are legitimately weak on some data, and the user decides.
"""
import dataclasses
import types

import numpy as np

SANITY_TRAIN = 1000  # images of the train split
SANITY_TEST = 500  # images of the test split
SANITY_K = 20
TEMPERATURE = 0.07  # NPID / paper §8.3
MARGIN = 2.0  # points of top-1: about the standard error of an accuracy near 50% on 500 images (sqrt(.25/500))
CLASSIFICATION = ("imagenet", "imagenet100", "stl10", "places205", "inat18")


def subset(split, n: int, seed: int = 0):
    """A fixed random subset of `n` images of a split (all of them when it has fewer)."""
    if len(split) <= n:
        return split
    idx = np.sort(np.random.default_rng(seed).permutation(len(split))[:n])
    return dataclasses.replace(
        split, split=f"{split.split}[sanity {n}]", labels=split.labels[idx],
        paths=[split.paths[i] for i in idx] if split.paths is not None else None,
        array=split.array[idx] if split.array is not None else None)


def knn_top1(model, cache_id, arch, train, test, transform, device, k) -> float:
    from backbones.features import extract_features
    from tasks.knn import knn_classify
    from tasks.metrics import topk_accuracy

    kw = dict(device=device, num_workers=0, use_cache=False, log=lambda *a, **k: None)
    xtr, ytr, _ = extract_features(model, cache_id, arch, train, transform, **kw)
    xte, yte, _ = extract_features(model, cache_id, arch, test, transform, **kw)
    classes = len(train.classes)
    scores = knn_classify(xtr, ytr, xte, (k,), TEMPERATURE, classes, device=device)[k]
    return topk_accuracy(scores, yte, (1,))[1]


def sanity_check(model, checkpoint, arch, tasks, protocols, data_root, device, say, rank=0, world=1, demo=False):
    """The kNN top-1 of the checkpoint and of a random encoder on a subset; None when no task of the command
    reads a classification dataset. Runs in one process (rank 0 of torchrun; the others wait at the task)."""
    from backbones.checkpoints import make_encoder
    from backbones.features import EvalTransform
    from datasets.catalog import read_classification
    from tasks.frozen import input_normalization

    chosen = next(((t, p) for t, p in zip(tasks, protocols)
                   if getattr(p, "dataset", None) in CLASSIFICATION and hasattr(p, "resize")), None)
    if chosen is None:
        say("sanity: no task of this command reads a classification dataset; nothing to check on")
        return None
    if rank != 0:
        return None
    task, p = chosen
    train = subset(read_classification(data_root, p.dataset, p.train_split, p.num_classes, p.class_list),
                   SANITY_TRAIN)
    test = subset(read_classification(data_root, p.dataset, p.test_split, p.num_classes, p.class_list),
                  SANITY_TEST, seed=1)
    mean, std = input_normalization(types.SimpleNamespace(checkpoint=checkpoint), p, {})
    transform = EvalTransform(p.resize, p.crop, mean, std, p.interpolation)
    if getattr(checkpoint, "family", "resnet") != "resnet":  # a ViT reads its release's input (families)
        from backbones.families import eval_transform

        transform = eval_transform(checkpoint, transform, demo=demo)
    k = min(SANITY_K, len(train))
    ours = knn_top1(model, checkpoint.cache_id, arch, train, test, transform, device, k)
    import torch

    with torch.random.fork_rng():  # building the random encoder must not move the tasks' random streams
        random_model, random_info, _ = make_encoder("random", arch, 0)
    baseline = knn_top1(random_model, random_info.cache_id, arch, train, test, transform, device, k)
    say(f"sanity ({task.name}'s data, {len(train)} train / {len(test)} test images, {k}-NN top-1): checkpoint "
        f"{ours:.1f}, random {arch} {baseline:.1f}")
    if ours < baseline + MARGIN:
        say(f"WARNING: {checkpoint.path} is no better than a random {arch} on this check ({ours:.1f} vs "
            f"{baseline:.1f} top-1; margin {MARGIN:g}): a wrong file, key or normalisation? (--inspect shows what "
            "was loaded)")
    return {"checkpoint": ours, "random": baseline, "warned": ours < baseline + MARGIN}
