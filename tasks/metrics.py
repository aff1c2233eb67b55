"""Classification metrics as small pure functions (each tested against a brute-force reference)."""
import torch


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """Percentage of rows whose label is among the k highest scores; k is capped at the class count."""
    out = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        hit = (scores.topk(kk, dim=1).indices == labels[:, None]).any(dim=1)
        out[k] = 100.0 * hit.float().mean().item()
    return out


def weighted_knn_scores(similarities: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int,
                        temperature: float) -> torch.Tensor:
    """Class scores from the k nearest neighbours, each voting exp(sim / T) for its label (NPID, Wu et al. 2018).

    similarities, neighbour_labels: (Q, k), neighbours sorted by decreasing similarity.
    """
    weights = (similarities / temperature).exp()
    scores = torch.zeros(similarities.shape[0], num_classes, dtype=weights.dtype)
    return scores.scatter_add_(1, neighbour_labels, weights)


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """Wang & Isola (2020): mean ||x_i - y_i||^alpha over positive pairs of L2-normalised features."""
    return (x - y).norm(dim=1).pow(alpha).mean().item()


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """Wang & Isola (2020): log of the mean Gaussian potential exp(-t ||x_i - x_j||^2) over pairs i < j."""
    return torch.pdist(x.double(), p=2).pow(2).mul(-t).exp().mean().log().item()


def voc_ap(scores, targets) -> float:
    """VOC average precision (all-point interpolated, VOC2010+ / the SVM benchmark of Goyal et al. 2019).

    targets: 1 positive, -1 negative, 0 ignored (VOC `difficult`-only images). Returns a fraction;
    NaN when there is no positive.
    """
    import numpy as np

    scores, targets = np.asarray(scores, float), np.asarray(targets)
    keep = targets != 0
    scores, positive = scores[keep], targets[keep] > 0
    if not positive.any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(positive[order])
    fp = np.cumsum(~positive[order])
    recall = np.concatenate([[0.0], tp / positive.sum(), [1.0]])
    precision = np.concatenate([[0.0], tp / np.maximum(tp + fp, 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the precision envelope
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(((recall[steps] - recall[steps - 1]) * precision[steps]).sum())
