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


# ---- the comparison methods' losses: each against a loop over its source's formula and, where lightly has
# ---- it, against lightly's implementation (lightly is a test-only dependency) ----------------------------

def pair(n=6, d=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


def test_nt_xent_loop_and_lightly():
    from lightly.loss import NTXentLoss

    from pretrain.losses import nt_xent_loss

    z1, z2 = pair()
    n, tau = z1.shape[0], 0.3
    zs = [unit(v) for v in z1.tolist() + z2.tolist()]
    total = 0.0
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        sims = {b: sum(x * y for x, y in zip(zs[a], zs[b])) / tau for b in range(2 * n) if b != a}
        total += -sims[pos] + math.log(sum(math.exp(s) for s in sims.values()))
    assert abs(nt_xent_loss(z1, z2, tau).item() - total / (2 * n)) < 1e-10  # mean over the 2N anchors
    assert abs(nt_xent_loss(z1, z2, tau).item() - NTXentLoss(temperature=tau)(z1, z2).item()) < 1e-10


def test_moco_loop_and_lightly():
    from lightly.loss import NTXentLoss

    from pretrain.losses import moco_infonce_loss

    q, k = pair(n=4, d=6)
    queue = torch.nn.functional.normalize(torch.randn(8, 6, dtype=torch.float64), dim=1)
    tau = 0.2
    total = 0.0
    for qi, ki in zip(q.tolist(), k.tolist()):
        qn, kn = unit(qi), unit(ki)
        logits = [sum(a * b for a, b in zip(qn, kn)) / tau] + [sum(a * b for a, b in zip(qn, r)) / tau
                                                              for r in queue.tolist()]
        total += -logits[0] + math.log(sum(math.exp(x) for x in logits))
    ours = moco_infonce_loss(q, k, queue, tau).item()
    assert abs(ours - total / q.shape[0]) < 1e-10
    lightly_loss = NTXentLoss(temperature=tau, memory_bank_size=(8, 6))
    lightly_loss.memory_bank.bank = queue.clone()
    assert abs(ours - lightly_loss(q, k).item()) < 1e-10  # out0 without grad: the bank is not updated


def test_barlow_twins_loop_and_lightly():
    from lightly.loss import BarlowTwinsLoss

    from pretrain.losses import barlow_twins_loss

    z1, z2 = pair(n=7, d=4)
    lambd = 0.0051

    def standardise(z):
        cols = list(zip(*z.tolist()))
        out = []
        for c in cols:
            m = sum(c) / len(c)
            var = sum((x - m) ** 2 for x in c) / len(c)  # biased, as BatchNorm in training
            out.append([(x - m) / math.sqrt(var + 1e-5) for x in c])
        return out  # per dimension

    a, b = standardise(z1), standardise(z2)
    n, d = z1.shape
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[i][t] * b[j][t] for t in range(n)) / n
            total += (1 - c) ** 2 if i == j else lambd * c ** 2
    ours = barlow_twins_loss(z1, z2, lambd).item()
    assert abs(ours - total) < 1e-9
    assert abs(ours - BarlowTwinsLoss(lambda_param=lambd)(z1, z2).item()) < 1e-9


def test_uniformity_pdist_formula_and_lightly():
    from lightly.loss.hypersphere_loss import HypersphereLoss

    from pretrain.losses import uniformity_loss

    z1, z2 = pair(n=9, d=4)
    for t in (2.0, 3.0):
        x = [unit(v) for v in z1.tolist()]
        terms = [math.exp(-t * sum((a - b) ** 2 for a, b in zip(x[i], x[j])))
                 for i in range(len(x)) for j in range(i + 1, len(x))]
        assert abs(uniformity_loss(z1, t).item() - math.log(sum(terms) / len(terms))) < 1e-10
        # lightly: align + (unif(x) + unif(y)) / 2 on normalised inputs
        x1, x2 = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
        align = (x1 - x2).norm(dim=1).pow(2).mean()
        both = HypersphereLoss(t=t, lam=1.0)(z1, z2) - align
        assert abs(both.item() - (uniformity_loss(z1, t) + uniformity_loss(z2, t)).item() / 2) < 1e-10
    # identical rows: finite gradient (pdist's is not)
    z = torch.ones(4, 3, requires_grad=True)
    uniformity_loss(z).backward()
    assert torch.isfinite(z.grad).all()


def test_byol_against_lightly_negative_cosine():
    from lightly.loss import NegativeCosineSimilarity

    p, z = make(k=2)
    ncs = NegativeCosineSimilarity()
    expected = (2 + 2 * ncs(p[:, 0], z[:, 1])) + (2 + 2 * ncs(p[:, 1], z[:, 0]))
    assert abs(byol_loss(p, z).item() - expected.item()) < 1e-10


def test_byol_multicrop_pairs():
    from pretrain.losses import byol_multicrop_loss

    p, z = make(k=2)
    two = byol_multicrop_loss([p[:, 0], p[:, 1]], [z[:, 0], z[:, 1]])
    assert abs(two.item() - byol_loss(p, z).item()) < 1e-10  # two crops: BYOL's loss
    g = torch.Generator().manual_seed(3)
    crops = [torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(5)]
    targets = [torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    expected = 0.0
    for t in range(2):
        for v in range(5):
            if v != t:
                expected += sum(sum((a - b) ** 2 for a, b in zip(unit(pv), unit(zt)))
                                for pv, zt in zip(crops[v].tolist(), targets[t].tolist())) / 5
    assert abs(byol_multicrop_loss(crops, targets).item() - expected) < 1e-10  # 2 x 4 pairs, summed


def test_whitening_and_wmse_against_lightly():
    from lightly.loss import WMSELoss
    from lightly.loss.wmse_loss import Whitening2d

    from pretrain.losses import whiten, wmse_loss

    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    w = whiten(x)
    assert torch.allclose(w.T @ w / 31, torch.eye(6, dtype=torch.float64), atol=1e-10)  # unbiased cov = I
    chol = torch.linalg.cholesky(torch.cov(x.T))
    assert torch.allclose(w, (x - x.mean(0)) @ torch.linalg.inv(chol).T, atol=1e-10)  # rows L^-1 (x - m)
    lightly_w = Whitening2d(6, track_running_stats=False).double()
    assert torch.allclose(w, lightly_w(x), atol=1e-10)
    for k, w_size, w_iter in ((2, 16, 1), (4, 16, 3), (2, 32, 2)):
        z = torch.randn(k, 32, 6, generator=g, dtype=torch.float64)
        torch.manual_seed(7)
        ours = wmse_loss(z, w_size, w_iter)
        torch.manual_seed(7)
        theirs = WMSELoss(embedding_dim=6, w_size=w_size, w_iter=w_iter, num_samples=k)(z.reshape(k * 32, 6))
        assert abs(ours.item() - theirs.item()) < 1e-9, (k, w_size, w_iter)


def test_wmse_loop():
    """W-MSE 2 with one sub-batch: 2 - 2 cos of the whitened views, by hand from the Cholesky factor."""
    from pretrain.losses import wmse_loss

    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 12, 3, generator=g, dtype=torch.float64)
    total = 0.0
    white = []
    for view in z:
        xc = view - view.mean(0)
        inv = torch.linalg.inv(torch.linalg.cholesky(xc.T @ xc / 11))
        white.append((xc @ inv.T).tolist())
    for a, b in zip(*white):
        total += 2 - 2 * sum(x * y for x, y in zip(unit(a), unit(b)))
    assert abs(wmse_loss(z, 12).item() - total / 12) < 1e-10


def test_drlim_loop():
    from pretrain.losses import drlim_loss

    z1, z2 = pair(n=5, d=3)
    m = 3.0
    zs = z1.tolist() + z2.tolist()
    n = z1.shape[0]
    dist = lambda a, b: math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))  # noqa: E731
    similar = [0.5 * dist(zs[i], zs[i + n]) ** 2 for i in range(n)]
    dissimilar = [0.5 * max(0.0, m - dist(zs[a], zs[b])) ** 2 for a in range(2 * n) for b in range(a + 1, 2 * n)
                  if a % n != b % n]
    assert len(dissimilar) == 2 * n * (n - 1)
    expected = sum(similar) / len(similar) + sum(dissimilar) / len(dissimilar)
    assert abs(drlim_loss(z1, z2, m).item() - expected) < 1e-9
    assert any(d > 0 for d in dissimilar) and any(d == 0 for d in dissimilar)  # the margin is active


def test_cpc_infonce_loop():
    from pretrain.losses import cpc_infonce_loss

    pred, target = pair(n=6, d=4)
    total = 0.0
    for i, p in enumerate(pred.tolist()):
        scores = [sum(a * b for a, b in zip(p, t)) for t in target.tolist()]
        total += -scores[i] + math.log(sum(math.exp(s) for s in scores))
    assert abs(cpc_infonce_loss(pred, target).item() - total / 6) < 1e-10


def test_msbreg_singular_value_loss_is_float32_under_bf16_autocast():
    """MSBReg's L_s as the method computes it (add_regularisers) under CPU bf16 autocast: its value and its
    gradient equal float32 arithmetic's (float64 reference of Eq. 6 on the same predictions). In bf16 the
    covariance's gradient is off by ~4% (normalised p̂) and the value by ~0.4% (raw p)."""
    from types import SimpleNamespace

    from pretrain.methods.msbreg import add_regularisers

    torch.manual_seed(0)
    for normalize in (True, False):
        p64 = torch.randn(256, 4, 64, dtype=torch.float64, requires_grad=True)
        expected = singular_value_loss(p64, normalize)
        expected.backward()
        cfg = SimpleNamespace(lambda_b=0.0, lambda_s=0.004, svl_normalize=normalize)
        p = p64.detach().float().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            terms = {}
            add_regularisers(cfg, p, torch.Generator().manual_seed(0), torch.zeros(()), terms)
        terms["loss_singular"].backward()
        assert terms["loss_singular"].dtype == torch.float32
        assert abs(terms["loss_singular"].item() - expected.item()) <= 2e-6 * expected.item(), normalize
        assert (p.grad.double() - p64.grad).norm() <= 1e-5 * p64.grad.norm(), normalize
