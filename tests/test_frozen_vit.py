"""The frozen-feature tasks on a ViT (a timm vit_tiny_patch16 at 32 px, built directly): each release's input, tap
and head, against timm's own forward and a brute-force DINO kNN written out here."""
import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms as T

from datasets.views import IMAGENET_MEAN, IMAGENET_STD
from tasks.context import RunContext
from tasks.frozen import DATASET_PRESETS, DEMO_PRESETS, tap_module


class TimmVit(torch.nn.Module):
    """The contract's ViT encoder: `.vit` is timm's VisionTransformer, forward the CLS token after the final norm."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.forward_features(x)[:, 0]


def tiny_vit(seed=0):
    """timm's vit_tiny_patch16 for 32 px inputs (a 2 x 2 grid of patches), as the family's encoder when
    backbones.vit is there (its ViTEncoder at the table's own grid: no position-embedding resize), else wrapped."""
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                            dynamic_img_size=True).eval()
    try:
        from backbones.vit import ViTEncoder
    except ImportError:
        return TimmVit(vit)
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    return ViTEncoder(vit, vit.pos_embed.detach().clone(), prefix, tuple(vit.patch_embed.grid_size), "timm").eval()


def vit_context(demo_root, tmp_path, release=None):
    info = types.SimpleNamespace(family="vit", release=release, vit={"width": 192}, input_normalization=None,
                                 normalization="imagenet", cache_id=f"test-vit-tiny-{release}", sha256=None,
                                 path=f"test-vit-tiny-{release}")
    return RunContext(tiny_vit(), info, "vit_tiny_patch16_224", demo_root, torch.device("cpu"), 0, True, tmp_path)


STL10 = {**DATASET_PRESETS["stl10"], **DEMO_PRESETS["stl10"], "resize": 36, "crop": 32, "workers": 0}


class STL10Files(torchvision.datasets.STL10):
    def _check_integrity(self):  # the demo files are not the release's
        return True


def timm_features(vit, root, split, fn):
    """Resize(37 = 32 x 256 / 224, bicubic), CenterCrop(32), ImageNet mean/std: the ViT eval input at the demo's
    crop; `fn(vit, x)` the feature, from timm's own forward."""
    t = T.Compose([T.Resize(37, T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                   T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    data = STL10Files(str(root / "stl10"), split=split, transform=t, download=False)
    xs, ys = [], []
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(data, batch_size=100):
            xs.append(fn(vit, x))
            ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def cls(vit, x):
    return vit.forward_features(x)[:, 0]


def last_blocks(vit, x, n, patchmean):
    """DINO / DINOv2's linear inputs from timm's get_intermediate_layers (each block's output through the norm)."""
    layers = vit.get_intermediate_layers(x, n=n, return_prefix_tokens=True, norm=True)
    parts = [prefix[:, 0] for _, prefix in layers]
    return torch.cat(parts + ([layers[-1][0].mean(1)] if patchmean else []), 1)


REFERENCE_TAPS = {"cls": cls, "cls_last4": lambda v, x: last_blocks(v, x, 4, False),
                  "cls+patchmean": lambda v, x: last_blocks(v, x, 1, True),
                  "cls_last4+patchmean": lambda v, x: last_blocks(v, x, 4, True)}


@pytest.mark.parametrize("tap", list(REFERENCE_TAPS))
def test_taps_are_timms_intermediate_layers(demo_root, tmp_path, tap):
    ctx = vit_context(demo_root, tmp_path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tap_module(ctx, tap)(x), REFERENCE_TAPS[tap](ctx.model.vit, x))


def test_vit_knn_is_dinos_knn_on_the_cls_token(demo_root, tmp_path):
    """DINO eval_knn.py on timm's CLS after the final norm, written out: L2-normalised, cosine, the 20 nearest
    voting exp(sim / 0.07) per class."""
    from tasks.knn import KnnProtocol, run

    ctx = vit_context(demo_root, tmp_path)
    out = run(ctx, KnnProtocol(**STL10, k=(5, 20)))
    assert out.probe == {"probe": "knn:npid", "tap": "cls"}
    assert out.info["transform"] == ("resize37-bicubic-crop32-mean0.485,0.456,0.406-std0.229,0.224,0.225")
    xtr, ytr = timm_features(ctx.model.vit, demo_root, "train", cls)
    xte, yte = timm_features(ctx.model.vit, demo_root, "test", cls)
    xtr, xte = F.normalize(xtr, dim=1), F.normalize(xte, dim=1)
    for k in (5, 20):
        correct = 0
        for q in range(len(xte)):
            sims = xtr @ xte[q]
            top = sims.argsort(descending=True)[:k]
            votes = torch.zeros(10, dtype=torch.float64)
            for j in top:
                votes[ytr[j]] += torch.exp(sims[j].double() / 0.07)
            correct += int(votes.argmax() == yte[q])
        assert out.metrics[f"stl10_knn{k}_top1"] == pytest.approx(100 * correct / len(xte)), k


def test_dinov2_grid_chooses_tap_and_l2_on_held_out_training_images(demo_root, tmp_path):
    from tasks.linear import LinearProtocol, best_l2, holdout_search, run, standardised_bank

    ctx = vit_context(demo_root, tmp_path, "dinov2")
    p = LinearProtocol(**STL10, max_iter=30, l2_grid=(1e-4, 1e-2, 1.0))
    out = run(ctx, p)
    table = out.info["holdout_top1_by_tap_and_l2"]
    assert set(table) == set(REFERENCE_TAPS)
    # the held-out search recomputed here on timm's features of each tap (training images only)
    for tap, fn in REFERENCE_TAPS.items():
        xtr, ytr = timm_features(ctx.model.vit, demo_root, "train", fn)
        torch.manual_seed(0)
        search = holdout_search(standardised_bank(xtr), ytr, 10, p.l2_grid, p.holdout_fraction, p.max_iter, 0)
        for l2, acc in search.items():
            assert table[tap][str(l2)] == pytest.approx(acc), (tap, l2)
    best = max(REFERENCE_TAPS, key=lambda t: (max(table[t].values()), -list(REFERENCE_TAPS).index(t)))
    assert out.probe == {"probe": "linear:fast", "tap": best} and out.info["tap"] == best
    assert out.info["chosen_l2"] == best_l2({float(k): v for k, v in table[best].items()})
    assert out.info["feature_dim"] == {"cls": 192, "cls_last4": 768, "cls+patchmean": 384,
                                       "cls_last4+patchmean": 960}[best]


@pytest.mark.parametrize("release, tap, head", [("mae", "cls", "bn_linear"), ("dino", "cls_last4", "linear"),
                                                (None, "cls", "linear")])
def test_release_tap_and_head_for_fast_and_sgd_probes(demo_root, tmp_path, monkeypatch, release, tap, head):
    from tasks import linear_sgd
    from tasks.linear import LinearProtocol, run

    trained = []
    real = linear_sgd.run
    monkeypatch.setattr(linear_sgd, "run", lambda ctx, sp, **kw: trained.append((ctx, sp)) or real(ctx, sp, **kw))

    ctx = vit_context(demo_root, tmp_path, release)
    p = LinearProtocol(**STL10, max_iter=20, l2_grid=(1e-2,), sgd_epochs=1, sgd_batch_size=100)
    fast = run(ctx, p)
    assert fast.probe["tap"] == tap and fast.info["head"] == head and fast.info["tap"] == tap
    sgd = run(ctx, dataclasses.replace(p, protocol="sgd"))
    assert sgd.probe["tap"] == tap and sgd.info["head"] == head
    assert sgd.info["feature_dim"] == {"cls": 192, "cls_last4": 768}[tap]
    assert sgd.info["test_transform"].startswith("resize37-bicubic-crop32-mean0.485")
    [(sgd_ctx, sp)] = trained
    # MAE main_linprobe.py: BatchNorm1d(affine=False, eps=1e-6) before the linear layer; the others a plain one
    assert sp.head_batchnorm == (head == "bn_linear") and sp.head_batchnorm_eps == 1e-6
    assert (sp.crop, sp.interpolation, tuple(sp.mean)) == (32, "bicubic", IMAGENET_MEAN)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the encoder the SGD probe trains on is the tap's
        torch.testing.assert_close(sgd_ctx.model(x), REFERENCE_TAPS[tap](ctx.model.vit, x))
    assert (tap == "cls") == (sgd_ctx.checkpoint.cache_id == ctx.checkpoint.cache_id)


def test_voc07_svm_on_a_vit_uses_its_cls_token_and_input(demo_root, tmp_path):
    """Goyal's res5 map is a ResNet's: a ViT's VOC07 SVMs read the CLS token after the final norm, on the ViT input
    (Resize(256, bicubic), CenterCrop(224)), and the features are timm's."""
    import numpy as np
    from PIL import Image

    from datasets.voc import read_voc_classification
    from tasks.voc07_svm import Voc07SvmProtocol, run

    ctx = vit_context(demo_root, tmp_path)
    out = run(ctx, Voc07SvmProtocol(costs=(0.1, 1.0), workers=0, save_features=True))
    assert out.probe["tap"] == "cls" and out.info["feature_dim"] == 192
    assert out.info["transform"] == "resize256-bicubic-crop224-mean0.485,0.456,0.406-std0.229,0.224,0.225"
    split = read_voc_classification(demo_root / "VOCdevkit", 2007, "test")
    t = T.Compose([T.Resize(256, T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                   T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    x = torch.stack([t(Image.open(split.paths[i]).convert("RGB")) for i in range(4)])
    with torch.no_grad():
        ref = F.normalize(cls(ctx.model.vit, x), dim=1).double().numpy()
    path = tmp_path / "features.npz"
    out.artifacts["features.npz"](path)
    np.testing.assert_allclose(np.load(path)["test_x"][:4], ref, rtol=1e-4, atol=1e-5)


def test_subset_logistic_regression_is_sklearns_on_l2_normalised_cls(demo_root, tmp_path):
    """1% subset: iBOT's logistic regression (L2-normalised CLS, L2 penalty, no intercept) against scikit-learn's
    LogisticRegression on timm's features, the L2 strength chosen on held-out subset images by sklearn too."""
    import numpy as np
    from PIL import Image
    from sklearn.linear_model import LogisticRegression

    from datasets.catalog import SUBDIRS, read_classification
    from datasets.imagenet import read_simclr_subset
    from tasks.frozen import FrozenFeatureProtocol
    from tasks.linear import SubsetLogisticRegression, stratified_holdout, subset_logistic_regression

    ctx = vit_context(demo_root, tmp_path)
    p = FrozenFeatureProtocol(**{**DATASET_PRESETS["imagenet"], **DEMO_PRESETS["imagenet"], "resize": 36, "crop": 32,
                                 "workers": 0})
    train = read_simclr_subset(demo_root / SUBDIRS["imagenet"], demo_root / SUBDIRS["imagenet_subsets"] /
                               "1percent.txt", num_classes=12)
    test = read_classification(demo_root, "imagenet", "val", 12, None)
    lr = SubsetLogisticRegression()
    acc, info = subset_logistic_regression(ctx, p, train, test, lr)

    t = T.Compose([T.Resize(37, T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                   T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def feats(split):
        with torch.no_grad():
            x = torch.stack([t(Image.open(f).convert("RGB")) for f in split.paths])
            return F.normalize(cls(ctx.model.vit, x), dim=1).double().numpy(), np.asarray(split.labels)

    (xtr, ytr), (xte, yte) = feats(train), feats(test)

    def sklearn_fit(x, y, lam):  # cyanure's objective mean loss + lam / 2 ||W||^2 is sklearn's at C = 1 / (n lam)
        return LogisticRegression(C=1 / (len(x) * lam), fit_intercept=False, tol=1e-10, max_iter=10000).fit(x, y)

    held = stratified_holdout(ytr, lr.holdout_fraction, seed=0)
    search = {lam: 100 * (sklearn_fit(xtr[~held], ytr[~held], lam).predict(xtr[held]) == ytr[held]).mean()
              for lam in lr.lambdas}
    assert info["holdout_top1_by_lambda"] == pytest.approx({str(k): v for k, v in search.items()})
    chosen = max(lr.lambdas, key=lambda lam: (search[lam], lam))
    assert info["chosen_lambda"] == chosen and info["tap"] == "cls"
    ref = sklearn_fit(xtr, ytr, chosen)
    assert acc[1] == pytest.approx(100 * (ref.predict(xte) == yte).mean())
    top5 = np.argsort(-ref.decision_function(xte), 1)[:, :5]
    assert acc[5] == pytest.approx(100 * (top5 == yte[:, None]).any(1).mean())


def test_semisup_1pct_on_a_frozen_vit_is_the_subset_logistic_regression(demo_root, tmp_path):
    """The 1% task on a ViT runs iBOT / MSN's logistic regression (checked against scikit-learn above) on the
    task's own subset and validation images, not the ResNet SGD classifier; `vit_frozen=sgd` brings that back."""
    from core.settings import with_overrides
    from datasets.catalog import SUBDIRS, read_classification
    from datasets.imagenet import read_simclr_subset
    from tasks import semisup
    from tasks.linear import subset_logistic_regression
    from tasks.registry import TASKS

    task = TASKS["semisup_1pct"]
    p = with_overrides(with_overrides(task.protocol, task.demo, "demo"), {"resize": "36", "crop": "32",
                                                                          "workers": "0"}, "test")
    ctx = vit_context(demo_root, tmp_path)
    out = semisup.run(ctx, p, "semisup_1pct")
    assert out.probe == {"probe": "semisup:logreg", "tap": "cls"}
    train = read_simclr_subset(demo_root / SUBDIRS["imagenet"], demo_root / SUBDIRS["imagenet_subsets"] /
                               p.train_subset, num_classes=p.num_classes)
    test = read_classification(demo_root, "imagenet", "val", p.num_classes, None)
    acc, info = subset_logistic_regression(vit_context(demo_root, tmp_path / "again"), p, train, test)
    assert out.metrics == {"semisup1_top1": acc[1], "semisup1_top5": acc[5]}
    assert out.info["chosen_lambda"] == info["chosen_lambda"]
    sgd = semisup.run(ctx, dataclasses.replace(p, vit_frozen="sgd", epochs=1), "semisup_1pct")
    assert sgd.probe["probe"] == "semisup:simclr"
