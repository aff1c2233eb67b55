"""The pretraining losses, as pure functions of tensors (no modules, no state).

MSBReg (paper §3, Eq. 3-6) and BYOL take (B, K, d) tensors: B images, K augmented views of each, d
embedding dimensions; `p` are online predictions, `z` target projections. The two-view losses of the
comparison methods take (N, d) embeddings of the two views. Inputs are unnormalised: each loss
normalises as its source does. A target the gradient must not reach is detached by the caller.

    >>> p, z = torch.randn(8, 4, 128), torch.randn(8, 4, 128)
    >>> total = multiview_centroid_loss(p, z) + 0.004 * singular_value_loss(p) + 0.5 * brownian_loss(p, torch.randn(8, 128))
    >>> nt_xent_loss(torch.randn(8, 128), torch.randn(8, 128), temperature=0.1)
"""
import math

import torch
import torch.nn.functional as F


# ---- MSBReg (paper §3) ---------------------------------------------------------------------------

def multiview_centroid_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Eq. 3: mean over images of (1/K) sum_j ||p̂_j - c||², c = (1/K) sum_l ẑ_l (not renormalised)."""
    p_hat = F.normalize(p, dim=-1)
    centroid = F.normalize(z, dim=-1).mean(dim=1, keepdim=True)
    return (p_hat - centroid).pow(2).sum(-1).mean()


def brownian_loss(p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Eq. 4: mean over images of (1/K) sum_j <n̂, p̂_j>, one Gaussian direction n per image (B, d)."""
    n_hat = F.normalize(noise, dim=-1).unsqueeze(1)
    return (F.normalize(p, dim=-1) * n_hat).sum(-1).mean()


def singular_value_loss(p: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Eq. 5-6: (1/K) sum_j ||S_j - I||_F², S_j the (B-1)-normalised covariance over the batch of view j.

    Eq. 5 writes the raw predictions p while the text says the normalised p̂; `normalize` chooses
    (default True, the text's p̂; the pretraining configs record the choice).
    """
    x = F.normalize(p, dim=-1) if normalize else p
    b, k, d = x.shape
    x = x - x.mean(dim=0, keepdim=True)
    cov = torch.einsum("bki,bkj->kij", x, x) / (b - 1)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    return (cov - eye).pow(2).sum(dim=(1, 2)).mean()


# ---- BYOL and its variants -------------------------------------------------------------------------

def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL (Grill et al. 2020, Eq. 2 symmetrised): for K = 2, ||p̂_1 - ẑ_2||² + ||p̂_2 - ẑ_1||², mean over images."""
    if p.shape[1] != 2:
        raise ValueError(f"byol_loss takes K = 2 views, got K = {p.shape[1]}")
    p_hat, z_hat = F.normalize(p, dim=-1), F.normalize(z, dim=-1)
    return ((p_hat - z_hat.flip(1)).pow(2).sum(-1)).sum(1).mean()


def byol_multicrop_loss(p: list, z: list) -> torch.Tensor:
    """BYOL with multi-crop as solo-learn pairs it (`solo/methods/byol.py`): the target projections z of the
    large crops (a list of (N, d)) against the online predictions p of every other crop (large or small), each
    pair's ||p̂ - ẑ||² averaged over images and the pairs summed. With two crops it is `byol_loss`."""
    total = 0
    for t, zt in enumerate(z):
        z_hat = F.normalize(zt, dim=-1)
        for v, pv in enumerate(p):
            if v != t:
                total = total + (F.normalize(pv, dim=-1) - z_hat).pow(2).sum(-1).mean()
    return total


def uniformity_loss(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola 2020 (`align_uniform.uniform_loss`): log of the mean over the N(N-1)/2 distinct pairs of
    exp(-t ||x_i - x_j||²), x the L2-normalised rows of z (N, d). On the unit sphere ||x_i - x_j||² = 2 - 2 x_i·x_j,
    which keeps the gradient finite when two rows coincide."""
    x = F.normalize(z, dim=-1)
    n = x.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=x.device)
    sq = (2 - 2 * (x @ x.T)[i, j]).clamp_min(0)
    return torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel())


# ---- contrastive: SimCLR, MoCo, DrLIM, CPC -------------------------------------------------------

def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, Eq. 1 and Alg. 1): cosine similarities / τ of the 2N L2-normalised
    embeddings; each anchor's positive is the other view of its image, its negatives the other 2N - 2; the
    cross-entropy is averaged over the 2N anchors (the paper's 1/2N; SimCLR's code returns twice this)."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    logits = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def moco_infonce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo (He et al. 2020, Eq. 1; `moco/builder.py`): for each query, logits [q̂·k̂, q̂·queue] / τ with the
    positive in column 0, cross-entropy averaged over the N queries. q, k (N, d) unnormalised; queue (K, d) holds the
    L2-normalised keys of earlier batches (the negatives)."""
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    logits = torch.cat([(q * k).sum(-1, keepdim=True), q @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def drlim_loss(z1: torch.Tensor, z2: torch.Tensor, margin: float) -> torch.Tensor:
    """DrLIM's contrastive loss (Hadsell, Chopra & LeCun 2006, Eq. 4): per pair (1 - Y) ½ D² + Y ½ max(0, m - D)²,
    D the Euclidean distance of the (unnormalised) embeddings. Similar pairs (Y = 0): the two views of an image;
    dissimilar pairs (Y = 1): every pair of the 2N embeddings from different images. The paper sums over its
    labelled pairs; with N similar pairs against 2N(N - 1) dissimilar ones, the two kinds are weighed equally
    here: the mean over similar pairs plus the mean over dissimilar pairs."""
    n = z1.shape[0]
    similar = 0.5 * (z1 - z2).pow(2).sum(-1).mean()
    z = torch.cat([z1, z2])
    sq = (z.pow(2).sum(-1)[:, None] + z.pow(2).sum(-1)[None, :] - 2 * z @ z.T).clamp_min(0)
    image = torch.arange(2 * n, device=z.device) % n
    i, j = torch.triu_indices(2 * n, 2 * n, offset=1, device=z.device)
    keep = image[i] != image[j]
    dist = sq[i[keep], j[keep]].clamp_min(1e-12).sqrt()
    dissimilar = 0.5 * F.relu(margin - dist).pow(2).mean()
    return similar + dissimilar


def cpc_infonce_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CPC's InfoNCE (van den Oord et al. 2018, Eq. 4; Hénaff et al. 2020): row i of `pred` (M, d), the
    prediction W_k c_t, scores every target row by a dot product (no normalisation, no temperature); its
    positive is target row i, the negatives all other rows (other positions and other images of the batch).
    Cross-entropy averaged over the M predictions."""
    logits = pred @ target.T
    return F.cross_entropy(logits, torch.arange(pred.shape[0], device=pred.device))


# ---- redundancy reduction: Barlow Twins, W-MSE -----------------------------------------------------

def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021, Eq. 1; `barlowtwins/main.py`): C = BN(z1)ᵀ BN(z2) / N with BN the
    per-dimension standardisation over the batch (BatchNorm1d without affine parameters in training: biased
    variance, eps 1e-5); loss = Σ_i (1 - C_ii)² + λ Σ_{i≠j} C_ij²."""
    n = z1.shape[0]
    c = F.batch_norm(z1, None, None, training=True).T @ F.batch_norm(z2, None, None, training=True) / n
    diag = torch.diagonal(c)
    return (1 - diag).pow(2).sum() + lambd * (c.pow(2).sum() - diag.pow(2).sum())


def whiten(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """W-MSE's whitening (Ermolov et al. 2021, Eq. 3; `methods/whitening.py` Whitening2d in training): centre the
    rows of x (..., n, d), Σ = (1 - eps) cov + eps I with the unbiased covariance, Σ = L Lᵀ (Cholesky), and return
    the rows L⁻¹ (x_i - mean). Batched over leading dimensions; gradients flow through the decomposition."""
    xc = x - x.mean(dim=-2, keepdim=True)
    cov = xc.transpose(-1, -2) @ xc / (x.shape[-2] - 1)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    chol = torch.linalg.cholesky((1 - eps) * cov + eps * eye)
    return torch.linalg.solve_triangular(chol, xc.transpose(-1, -2), upper=False).transpose(-1, -2)


def wmse_loss(z: torch.Tensor, w_size: int, w_iter: int = 1, eps: float = 0.0, generator=None) -> torch.Tensor:
    """W-MSE (`methods/w_mse.py`): z (K, N, d) holds K views of N images. w_iter times, the images are split at
    random into sub-batches of w_size (the same images for every view), each view's sub-batch is whitened, and
    the normalised MSE 2 - 2 cos between the whitened views of each of the K(K-1)/2 view pairs is averaged over
    images; the result is the mean over the w_iter x pairs."""
    k, n, d = z.shape
    if n % w_size:
        raise ValueError(f"W-MSE needs a batch that is a multiple of w_size ({n} images, w_size {w_size})")
    device = generator.device if generator is not None else "cpu"
    total, pairs = 0, k * (k - 1) // 2
    for _ in range(w_iter):
        perm = torch.randperm(n, generator=generator, device=device).to(z.device)
        chunks = z[:, perm].reshape(k, n // w_size, w_size, d)  # the same sub-batches for every view
        w = whiten(chunks, eps).reshape(k, n, d)
        w = F.normalize(w, dim=-1)
        for i in range(k - 1):
            for j in range(i + 1, k):
                total = total + 2 - 2 * (w[i] * w[j]).sum(-1).mean()
    return total / (w_iter * pairs)
