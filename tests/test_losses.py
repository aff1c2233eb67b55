"""Each loss against a direct loop over the paper's equation."""
import math

import torch

from pretrain.losses import brownian_loss, byol_loss, multiview_centroid_loss, singular_value_loss


def unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def rows(t):
    return [[t[b, k].tolist() for k in range(t.shape[1])] for b in range(t.shape[0])]


def make(b=6, k=4, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, d, generator=g, dtype=torch.float64), torch.randn(b, k, d, generator=g, dtype=torch.float64)


def test_centroid_loss_eq3():
    p, z = make()
    total = 0.0
    for pb, zb in zip(rows(p), rows(z)):
        zs = [unit(v) for v in zb]
        c = [sum(v[i] for v in zs) / len(zs) for i in range(len(zs[0]))]
        total += sum(sum((a - ci) ** 2 for a, ci in zip(unit(pj), c)) for pj in pb) / len(pb)
    assert abs(multiview_centroid_loss(p, z).item() - total / p.shape[0]) < 1e-10


def test_centroid_loss_zero_when_views_agree():
    z = torch.randn(3, 1, 8).repeat(1, 4, 1)
    assert multiview_centroid_loss(2.5 * z, z).item() < 1e-10


def test_brownian_loss_eq4():
    p, _ = make()
    noise = torch.randn(p.shape[0], p.shape[2], dtype=torch.float64)
    total = 0.0
    for pb, n in zip(rows(p), noise.tolist()):
        nh = unit(n)
        total += sum(sum(a * b for a, b in zip(unit(pj), nh)) for pj in pb) / len(pb)
    assert abs(brownian_loss(p, noise).item() - total / p.shape[0]) < 1e-10


def test_singular_value_loss_eq6():
    p, _ = make(b=7, k=3, d=4)
    for normalize in (True, False):
        x = torch.nn.functional.normalize(p, dim=-1) if normalize else p
        b, k, d = x.shape
        total = 0.0
        for j in range(k):
            mean = [sum(x[i, j, a].item() for i in range(b)) / b for a in range(d)]
            for a in range(d):
                for c in range(d):
                    s = sum((x[i, j, a].item() - mean[a]) * (x[i, j, c].item() - mean[c]) for i in range(b)) / (b - 1)
                    total += (s - (1.0 if a == c else 0.0)) ** 2
        assert abs(singular_value_loss(p, normalize).item() - total / k) < 1e-9


def test_byol_loss_hand_computed():
    p = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    z = torch.tensor([[[0.0, 3.0], [2.0, 0.0]]])
    assert byol_loss(p, z).item() == 0.0  # each prediction points at the other view's projection
    assert abs(byol_loss(p, z.flip(1)).item() - 4.0) < 1e-6  # 2 + 2
    p, z = make(k=2)
    expected = 0.0
    for pb, zb in zip(rows(p), rows(z)):
        for j in range(2):
            expected += sum((a - c) ** 2 for a, c in zip(unit(pb[j]), unit(zb[1 - j])))
    assert abs(byol_loss(p, z).item() - expected / p.shape[0]) < 1e-10


def test_no_gradient_into_detached_target():
    p, z = make()
    p.requires_grad_(True)
    z.requires_grad_(True)
    multiview_centroid_loss(p, z.detach()).backward()
    assert p.grad is not None and z.grad is None
