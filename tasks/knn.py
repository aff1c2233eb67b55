"""k-nearest-neighbour classification on frozen features, by two published protocols.

- `npid` (paper §8.3, Table 4; NPID / LA): cosine similarity on L2-normalised pooled features, exact
  search (`knn_search`: FAISS per block of the bank on the CPU, torch matrix products on the GPU),
  each of the k neighbours voting exp(sim / T) for its class.
- `wmse` (Table 1, whose ResNet-18 rows are W-MSE's numbers; htdt/self-supervised eval/knn.py): Euclidean
  distance on the unnormalised pooled features, a plain majority vote of the k = 5 nearest, ties to the
  smallest class index (`unique(return_counts)` then `argmax` there); top-1 only, as W-MSE reports.

A ViT gets DINO's kNN (eval_knn.py; DINOv2 the same): its own input (backbones.families), the CLS token after the
final norm, L2-normalised, votes exp(sim / 0.07); k = 20 is among the suite's k.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.cli import UserError
from core.settings import setting
from tasks.context import TaskOutput
from tasks.frozen import FrozenFeatureProtocol, features_artifact, train_test_features
from tasks.metrics import topk_accuracy, weighted_knn_scores


WMSE_KNN = "W-MSE's kNN (htdt/self-supervised eval/knn.py eval_knn; k = cfg.knn, default 5)"
PROTOCOLS = ("npid", "wmse")
# The published protocols a kNN task can be switched to with --set protocol=NAME: {name: {key: (value, source)}}.
PRESETS = {"npid": {}, "wmse": {"k": ((5,), WMSE_KNN)}}


@dataclass(frozen=True)
class KnnProtocol(FrozenFeatureProtocol):
    protocol: str = setting("npid", "npid: weighted cosine kNN (paper §8.3, Table 4); wmse: W-MSE's Euclidean "
                                    "majority vote (Table 1)", choices=PROTOCOLS)
    k: tuple[int, ...] = setting((5, 20, 200), "paper §8.3: 20/200-NN on ImageNet, 5-NN on ImageNet-100 and STL-10; "
                                              "all three reported together (20: the k DINO / DINOv2 report for ViTs)")
    temperature: float = setting(0.07, "paper §8.3 / NPID (Wu et al. 2018): votes weighted by exp(sim / 0.07); "
                                       "DINO eval_knn.py's T for ViTs is the same 0.07")
    query_chunk: int = setting(4096, "runtime setting (queries searched per call); does not change results")
    bank_dtype: str = setting("float32", "float32: exact; float16: the bank held in half precision (half the "
                                       "memory: an ImageNet bank of 1.28M x 2048 in 5 GB), searched exactly "
                                       "block by block (CPU: each block widened to float32 for FAISS's exhaustive "
                                       "inner-product search; GPU: float16 products accumulated in float32)")


def knn_search(bank: torch.Tensor, queries: torch.Tensor, k: int, chunk: int, device="cpu",
               bank_dtype: str = "float32", block: int = 32768):
    """Exact inner-product search: (similarities, indices), each (Q, k) on the CPU, best first.

    The bank is held in `bank_dtype` (a float16 bank takes half the memory; a bank already in that dtype
    is used without a copy) and read `block` rows at a time, each block's top k merged into a running top
    k per query (`merge_topk`), so the bank is read once whatever the number of queries. On the CPU each
    float16 block is widened to float32 in one reused buffer, and FAISS's exhaustive search (BLAS products
    and a heap per query) finds the block's top k for `chunk` queries at a time: a float16 bank searches at
    the float32 rate, and its similarities are the float32 products with the stored bank, so its
    neighbours are those of a float32 search except for ties within float16 rounding. With CUDA the
    blocks are copied to `device` (the run's GPU) in turn (the bank need not fit there) and multiplied with torch, a float16
    bank with float16 queries in half precision with float32 accumulation and output.
    """
    if bank_dtype not in ("float32", "float16"):
        raise UserError(f"bank_dtype must be float32 or float16, not {bank_dtype!r}")
    if not 0 < k <= len(bank):
        raise ValueError(f"k = {k} neighbours asked of a bank of {len(bank)}")
    dtype = getattr(torch, bank_dtype)
    device = torch.device(device)
    on_cpu, bank = device.type == "cpu", bank.to(dtype)
    if on_cpu:
        import faiss  # where it searches (0.3 s to load): not for every command that only lists the tasks
    half_matmul = not on_cpu and dtype == torch.float16
    queries = queries.to(device, dtype if half_matmul else torch.float32).contiguous()
    # a buffer reused block after block: a fresh allocation this large costs page faults every time
    widened = torch.empty(min(block, len(bank)), bank.shape[1]) if on_cpu and dtype != torch.float32 else None
    best_sims = torch.full((len(queries), k), -float("inf"), device=device)
    best_idx = torch.zeros((len(queries), k), dtype=torch.long, device=device)
    for start in range(0, len(bank), block):
        rows = bank[start:start + block]
        rows = widened[:len(rows)].copy_(rows) if widened is not None else rows.to(device, non_blocking=True)
        kk = min(k, len(rows))
        for q in range(0, len(queries), chunk):
            qc = queries[q:q + chunk]
            if on_cpu:
                sims, idx = (torch.from_numpy(a) for a in
                             faiss.knn(qc.numpy(), rows.numpy(), kk, faiss.METRIC_INNER_PRODUCT))
            else:
                sims = torch.mm(qc, rows.T, out_dtype=torch.float32) if half_matmul else qc @ rows.T
                sims, idx = sims.topk(kk, dim=1, sorted=False)
            best_sims[q:q + chunk], best_idx[q:q + chunk] = merge_topk(
                best_sims[q:q + chunk], best_idx[q:q + chunk], sims, idx + start, k)
    return best_sims.cpu(), best_idx.cpu()


def merge_topk(sims_a, idx_a, sims_b, idx_b, k):
    """The k best of two candidate lists per query (each (Q, *)), best first."""
    sims, pos = torch.cat([sims_a, sims_b], 1).topk(k, dim=1)
    return sims, torch.cat([idx_a, idx_b], 1).gather(1, pos)


def knn_classify(train_x, train_y, test_x, ks, temperature, num_classes, chunk=4096, device="cpu",
                 bank_dtype="float32"):
    """{k: class scores (Q, C)} for every k in `ks` from one search for max(ks) neighbours."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    sims, idx = knn_search(train_x, test_x, max(ks), chunk, device, bank_dtype)
    neighbour_labels = train_y[idx]
    return {k: weighted_knn_scores(sims[:, :k], neighbour_labels[:, :k], num_classes, temperature) for k in ks}


def majority_vote_knn(train_x, train_y, test_x, k: int, num_classes: int, chunk: int = 4096) -> torch.Tensor:
    """W-MSE's kNN: the labels predicted by a majority vote of the k nearest training rows in Euclidean distance
    (torch.cdist), ties to the smallest class index."""
    preds = []
    for start in range(0, len(test_x), chunk):
        d = torch.cdist(test_x[start:start + chunk].double(), train_x.double())
        labels = train_y[d.topk(k, dim=1, largest=False).indices]
        votes = torch.zeros(len(labels), num_classes, dtype=torch.long).scatter_add_(1, labels, torch.ones_like(labels))
        preds.append(votes.argmax(1))  # the first of equal counts: the smallest class index
    return torch.cat(preds)


def run(ctx, p: KnnProtocol) -> TaskOutput:
    def check(splits):
        too_big = [k for k in p.k if k > len(splits["train"])]
        if too_big:
            raise UserError(f"k={too_big[0]} exceeds the {len(splits['train'])} training images; "
                            "lower it with --set k=...")

    (xtr, ytr), (xte, yte), info = train_test_features(ctx, p, check)
    if ctx.rank != 0:
        return TaskOutput({})
    metrics = {}
    if p.protocol == "wmse":
        for k in p.k:
            pred = majority_vote_knn(xtr, ytr, xte, k, p.num_classes, p.query_chunk)
            metrics[f"{p.metric_prefix}_knn{k}_top1"] = 100.0 * (pred == yte).double().mean().item()
        info["distance"] = "euclidean, unnormalised features, majority vote"
    else:
        scores = knn_classify(xtr, ytr, xte, p.k, p.temperature, p.num_classes, p.query_chunk,
                              device=ctx.device, bank_dtype=p.bank_dtype)
        for k, s in scores.items():
            acc = topk_accuracy(s, yte, (1, 5))
            metrics[f"{p.metric_prefix}_knn{k}_top1"] = acc[1]
            metrics[f"{p.metric_prefix}_knn{k}_top5"] = acc[5]
        info["distance"] = f"cosine, L2-normalised features, votes exp(sim / {p.temperature})"
    artifacts = features_artifact(xtr, ytr, xte, yte) if p.save_features else {}
    return TaskOutput(metrics, info, artifacts=artifacts, probe={"probe": f"knn:{p.protocol}", "tap": info["tap"]})
