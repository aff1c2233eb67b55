"""The MSBReg losses (paper §3, Eq. 3-6) and BYOL's, as pure functions of (B, K, d) tensors.

B images, K augmented views of each, d embedding dimensions. `p` are online predictions, `z`
target projections (the caller detaches them: no gradient flows into the target).

    >>> p, z = torch.randn(8, 4, 128), torch.randn(8, 4, 128)
    >>> total = multiview_centroid_loss(p, z) + 0.004 * singular_value_loss(p) + 0.5 * brownian_loss(p, torch.randn(8, 128))
"""
import torch
import torch.nn.functional as F


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


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL (Grill et al. 2020, Eq. 2 symmetrised): for K = 2, ||p̂_1 - ẑ_2||² + ||p̂_2 - ẑ_1||², mean over images."""
    if p.shape[1] != 2:
        raise ValueError(f"byol_loss takes K = 2 views, got K = {p.shape[1]}")
    p_hat, z_hat = F.normalize(p, dim=-1), F.normalize(z, dim=-1)
    return ((p_hat - z_hat.flip(1)).pow(2).sum(-1)).sum(1).mean()
