"""k-nearest-neighbour classification on frozen features (paper §8.3, following NPID / LA).

Cosine similarity on L2-normalised pooled features, exact search with FAISS (GPU index when CUDA
is there), each of the k neighbours voting exp(sim / T) for its class.
"""
from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from core.cli import UserError
from core.settings import setting
from tasks.context import TaskOutput
from tasks.frozen import FrozenFeatureProtocol, train_test_features
from tasks.metrics import topk_accuracy, weighted_knn_scores


@dataclass(frozen=True)
class KnnProtocol(FrozenFeatureProtocol):
    k: tuple[int, ...] = setting((5, 20, 200), "paper §8.3: 20/200-NN on ImageNet, 5-NN on ImageNet-100 and STL-10; "
                                              "all three reported together")
    temperature: float = setting(0.07, "paper §8.3 / NPID (Wu et al. 2018): votes weighted by exp(sim / 0.07)")
    query_chunk: int = setting(4096, "runtime setting (queries searched per call); does not change results")
    bank_dtype: str = setting("float32", "float32: exact; float16: the bank stored in half precision (FAISS fp16 "
                                       "scalar quantizer), so that an ImageNet bank (1.28M x 2048) fits in 24 GB")


def knn_search(bank: torch.Tensor, queries: torch.Tensor, k: int, chunk: int, use_gpu: bool,
               bank_dtype: str = "float32"):
    """Exhaustive inner-product search: (similarities, indices), each (Q, k), best first."""
    if bank_dtype == "float32":
        index = faiss.IndexFlatIP(bank.shape[1])
    elif bank_dtype == "float16":
        index = faiss.IndexScalarQuantizer(bank.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    else:
        raise UserError(f"bank_dtype must be float32 or float16, not {bank_dtype!r}")
    if use_gpu and hasattr(faiss, "StandardGpuResources"):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(np.ascontiguousarray(bank.numpy(), dtype=np.float32))
    sims, idx = [], []
    for start in range(0, len(queries), chunk):
        s, i = index.search(np.ascontiguousarray(queries[start:start + chunk].numpy(), dtype=np.float32), k)
        sims.append(torch.from_numpy(s))
        idx.append(torch.from_numpy(i))
    return torch.cat(sims), torch.cat(idx)


def knn_classify(train_x, train_y, test_x, ks, temperature, num_classes, chunk=4096, use_gpu=False,
                 bank_dtype="float32"):
    """{k: class scores (Q, C)} for every k in `ks` from one search for max(ks) neighbours."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    sims, idx = knn_search(train_x, test_x, max(ks), chunk, use_gpu, bank_dtype)
    neighbour_labels = train_y[idx]
    return {k: weighted_knn_scores(sims[:, :k], neighbour_labels[:, :k], num_classes, temperature) for k in ks}


def run(ctx, p: KnnProtocol) -> TaskOutput:
    def check(splits):
        too_big = [k for k in p.k if k > len(splits["train"])]
        if too_big:
            raise UserError(f"k={too_big[0]} exceeds the {len(splits['train'])} training images; "
                            "lower it with --set k=...")

    (xtr, ytr), (xte, yte), info = train_test_features(ctx, p, check)
    scores = knn_classify(xtr, ytr, xte, p.k, p.temperature, p.num_classes, p.query_chunk,
                          use_gpu=ctx.device.startswith("cuda"), bank_dtype=p.bank_dtype)
    metrics = {}
    for k, s in scores.items():
        acc = topk_accuracy(s, yte, (1, 5))
        metrics[f"{p.metric_prefix}_knn{k}_top1"] = acc[1]
        metrics[f"{p.metric_prefix}_knn{k}_top5"] = acc[5]
    return TaskOutput(metrics, info, probe={"probe": "knn"})
