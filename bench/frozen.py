#!/usr/bin/env python
"""Speed of the frozen-feature machinery, measured side by side in one run (ratios are the result).

    python bench/frozen.py                   # both parts
    python bench/frozen.py --only knn --bank 200000

1. kNN search throughput (FAISS exhaustive inner product, float32 and float16 banks) against the
   machine's float32 matrix-multiply rate on the same sizes, and the peak memory of the search.
2. Feature extraction images/s of `backbones.features.extract_features` against a plain torchvision
   eval loop (same model, images, transform, batch size and workers).
"""
import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports kB


def bench_knn(n_bank, n_query, dim, k, chunk):
    from tasks.knn import knn_search

    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(n_bank, dim, generator=g), dim=1)
    queries = F.normalize(torch.randn(n_query, dim, generator=g), dim=1)
    flop = 2.0 * n_bank * n_query * dim
    torch.matmul(queries[:256], bank[:4096].T)  # warm-up
    t = time.perf_counter()
    for start in range(0, n_bank, 65536):  # the same products, in blocks that fit the memory
        torch.matmul(queries, bank[start:start + 65536].T)
    t_mm = time.perf_counter() - t
    print(f"bank {n_bank} x {dim}, {n_query} queries, k = {k}")
    print("| method | seconds | GFLOP/s | share of matmul rate | peak RSS GB so far |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| torch.matmul float32 | {t_mm:.2f} | {flop / t_mm / 1e9:.1f} | 100% | {peak_rss_gb():.2f} |")
    for dtype in ("float32", "float16"):
        t = time.perf_counter()
        knn_search(bank, queries, k, chunk, False, dtype)
        dt = time.perf_counter() - t
        print(f"| FAISS search, {dtype} bank | {dt:.2f} | {flop / dt / 1e9:.1f} | {t_mm / dt:.0%} | {peak_rss_gb():.2f} |")
    print(f"ImageNet-size bank (1,281,167 x 2048): {1281167 * 2048 * 4 / 1e9:.1f} GB in float32, "
          f"{1281167 * 2048 * 2 / 1e9:.1f} GB in float16, plus queries in chunks of {chunk}")


def bench_extract(size, batch, workers):
    from torchvision import models

    from backbones.features import extract_features
    from datasets.views import EvalTransform
    from datasets.catalog import ensure_demo
    from datasets.imagenet import read_imagenet

    split = read_imagenet(ensure_demo() / "imagenet", "train")
    transform = EvalTransform(size, size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    model = models.resnet18()
    model.fc = torch.nn.Identity()
    model.eval()

    def plain():
        ds = split.torch_dataset(transform.build())
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers,
                                             collate_fn=lambda b: torch.stack([x for x, _ in b]))
        with torch.no_grad():
            return torch.cat([model(x) for x in loader])

    def ours():
        return extract_features(model, "bench", "resnet18", split, transform, batch_size=batch, num_workers=workers,
                                use_cache=False, log=lambda *a: None)[0]

    plain()  # warm-up (page cache, kernels)
    rows = []
    for name, fn in (("plain torchvision loop", plain), ("extract_features", ours)) * 2:
        t = time.perf_counter()
        fn()
        rows.append((name, len(split) / (time.perf_counter() - t)))
    print(f"\nfeature extraction: ResNet-18, {len(split)} demo images at {size} px, batch {batch}, {workers} workers")
    print("| loop | images/s (two alternating runs each) |")
    print("| --- | --- |")
    for name in ("plain torchvision loop", "extract_features"):
        print(f"| {name} | {' / '.join(f'{r:.0f}' for n, r in rows if n == name)} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["knn", "extract"])
    p.add_argument("--bank", type=int, default=200_000)
    p.add_argument("--queries", type=int, default=2048)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--size", type=int, default=160)
    args = p.parse_args(argv)
    if args.only in (None, "knn"):
        bench_knn(args.bank, args.queries, args.dim, 200, 4096)
    if args.only in (None, "extract"):
        bench_extract(args.size, 64, 2)


if __name__ == "__main__":
    main()
