"""Alignment and uniformity with the images decoded in loader processes: the numbers of an in-process decode of
the same images, with the same views, and Wang & Isola's formulas written out as loops."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from evaluate.run import cli


def reference_metrics(demo_root, seed=0):
    """The task's steps done here in one process: decode, two views per image from one generator, embed."""
    from backbones.checkpoints import make_encoder
    from datasets.catalog import IN100_DEMO_CLASSES, read_classification
    from datasets.decode import SquareImages
    from datasets.views import IMAGENET_MEAN, IMAGENET_STD, ViewAugment, augment_view

    model, _, _ = make_encoder("random", "resnet18", seed)
    split = read_classification(demo_root, "imagenet100", "val", 6, IN100_DEMO_CLASSES)
    images = SquareImages([split], 64)
    g = torch.Generator().manual_seed(seed)
    views = ([], [])
    with torch.no_grad():
        for start in range(0, len(images), 16):
            batch = images.batch(range(start, min(len(images), start + 16)))
            for v in views:
                v.append(F.normalize(model(augment_view(batch, ViewAugment(crop_size=48), g, IMAGENET_MEAN,
                                                        IMAGENET_STD)), dim=1))
    x, y = torch.cat(views[0]).double(), torch.cat(views[1]).double()
    n = len(x)
    align = sum(((x[i] - y[i]) ** 2).sum() for i in range(n)) / n  # alpha = 2: the squared distance

    def uniform(z):
        pairs = [math.exp(-2 * ((z[i] - z[j]) ** 2).sum().item()) for i in range(n) for j in range(i + 1, n)]
        return math.log(sum(pairs) / len(pairs))

    return {"alignment": float(align), "uniformity": (uniform(x) + uniform(y)) / 2}


@pytest.mark.parametrize("workers", [0, 2])
def test_decoding_in_workers_gives_the_in_process_numbers(tmp_path, demo_root, workers):
    out = tmp_path / str(workers)
    assert cli(["--ckpt", "random", "--arch", "resnet18", "--task", "align_uniform", "--demo", "--out", str(out),
                "--set", "batch_size=16", "--set", f"workers={workers}"]) == 0
    rec = json.loads(next((out / "records").rglob("*.json")).read_text())
    expected = reference_metrics(demo_root)
    assert rec["metrics"]["alignment"] == pytest.approx(expected["alignment"], rel=1e-5)
    assert rec["metrics"]["uniformity"] == pytest.approx(expected["uniformity"], rel=1e-5)
