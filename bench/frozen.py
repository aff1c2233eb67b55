#!/usr/bin/env python
"""Speed of the frozen-feature machinery, measured side by side in one run (ratios are the result).

    python bench/frozen.py                   # both parts
    python bench/frozen.py --only knn --bank 200000

1. kNN search (`tasks.knn.knn_search`, k = 200) with a float32 and a float16 bank, beside FAISS's exact
   float32 search (IndexFlatIP, the reference for the neighbours) and the machine's float32
   `torch.matmul` rate on the same products. Each method runs in its own process, twice, in alternating
   order, so that the peak resident memory is that method's alone (the bank is built in its storage dtype a
   block at a time) and a change of machine load hits every method alike. The neighbours of both banks
   are checked against FAISS's exact float32 ones: at every rank r, the exact similarity of our r-th
   neighbour must be within float16 rounding (2 x 2^-11 for unit vectors) of the exact r-th similarity.
2. Feature extraction images/s of `backbones.features.extract_features` against a plain torchvision
   eval loop (same model, images, transform, batch size and workers).
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

KNN_METHODS = ("torch.matmul float32", "FAISS IndexFlatIP float32", "knn_search float32", "knn_search float16")
FLOAT16_TIE = 2 * 2.0 ** -11 + 1e-5  # two float16 roundings of a unit vector's inner product, plus float32 sums


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports kB


def unit_rows(n, dim, dtype, seed, block=8192):
    """n random unit vectors stored in `dtype`, made a block at a time (no float32 copy of a float16 bank)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, dim, dtype=dtype)
    for start in range(0, n, block):
        out[start:start + block] = F.normalize(torch.randn(min(block, n - start), dim, generator=g), dim=1)
    return out


def knn_one(method, n_bank, n_query, dim, k, chunk, result_file):
    """Runs in its own process: prints one JSON line with the method's time and memory."""
    rss_start = peak_rss_gb()
    dtype = torch.float16 if method.endswith("float16") else torch.float32
    bank = unit_rows(n_bank, dim, dtype, seed=0)
    queries = unit_rows(n_query, dim, torch.float32, seed=1)
    torch.matmul(queries[:256], bank[:4096].float().T)  # warm-up
    start = time.perf_counter()
    if method == "torch.matmul float32":
        for b in range(0, n_bank, 8192):  # the search's products alone, no top-k
            torch.matmul(queries, bank[b:b + 8192].T)
        sims = idx = None
    elif method.startswith("FAISS"):
        import faiss

        index = faiss.IndexFlatIP(dim)
        index.add(bank.numpy())
        sims, idx = index.search(queries.numpy(), k)
    else:
        from tasks.knn import knn_search

        sims, idx = (t.numpy() for t in knn_search(bank, queries, k, chunk, False, str(dtype).split(".")[1]))
    seconds = time.perf_counter() - start
    if sims is not None:
        np.savez(result_file, sims=sims, idx=idx)
    print(json.dumps({"seconds": seconds, "peak_gb": peak_rss_gb(), "start_gb": rss_start,
                      "bank_gb": bank.numel() * bank.element_size() / 1e9}))


def neighbour_check(results, n_bank, n_query, dim, k):
    """Per method: (neighbours differing from FAISS's, largest gap |exact sim of our r-th - exact r-th|)."""
    bank = unit_rows(n_bank, dim, torch.float32, seed=0)
    queries = unit_rows(n_query, dim, torch.float32, seed=1).double()
    ref_sims, ref_idx = (torch.from_numpy(results[KNN_METHODS[1]][key]) for key in ("sims", "idx"))
    out = {}
    for method in KNN_METHODS[2:]:
        idx = torch.from_numpy(results[method]["idx"])
        gap = 0.0
        for q in range(0, n_query, 64):  # exact (float64) similarities of the neighbours we returned
            exact = torch.einsum("qd,qkd->qk", queries[q:q + 64], bank[idx[q:q + 64]].double())
            gap = max(gap, (exact - ref_sims[q:q + 64].double()).abs().max().item())
        differing = sum(len(set(a) - set(b)) for a, b in zip(idx.tolist(), ref_idx.tolist()))
        out[method] = differing, gap
    return out


def bench_knn(n_bank, n_query, dim, k, chunk):
    flop = 2.0 * n_bank * n_query * dim
    print(f"bank {n_bank} x {dim}, {n_query} queries, k = {k}; each method in its own process, two rounds")
    times, info, results = {m: [] for m in KNN_METHODS}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(2):
            for i, method in enumerate(KNN_METHODS if round_ == 0 else KNN_METHODS[::-1]):
                out = Path(tmp) / f"{KNN_METHODS.index(method)}.npz"
                cmd = [sys.executable, __file__, "--knn-one", method, f"--bank={n_bank}", f"--queries={n_query}",
                       f"--dim={dim}", f"--k={k}", f"--chunk={chunk}", f"--result={out}"]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{method} failed: {done.stderr.strip()}")
                r = json.loads(done.stdout.strip().splitlines()[-1])
                times[method].append(r["seconds"])
                info[method] = r
                if out.exists():
                    results[method] = dict(np.load(out))
    checks = neighbour_check(results, n_bank, n_query, dim, k)
    best = {m: min(t) for m, t in times.items()}  # the less disturbed of the two rounds
    ours32 = best["knn_search float32"]
    print("| method | bank GB | seconds (two rounds) | GFLOP/s (best) | rate / knn_search float32 | "
          "peak RSS GB (at start) | neighbours differing from FAISS float32 | largest exact-similarity gap |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in KNN_METHODS:
        differing, gap = checks.get(m, ("reference" if m.startswith("FAISS") else "-", None))
        print(f"| {m} | {info[m]['bank_gb']:.2f} | {' / '.join(f'{t:.2f}' for t in times[m])} | "
              f"{flop / best[m] / 1e9:.1f} | {ours32 / best[m]:.0%} | {info[m]['peak_gb']:.2f} "
              f"({info[m]['start_gb']:.2f}) | {differing} | {'-' if gap is None else f'{gap:.1e}'} |")
    ok = all(gap <= FLOAT16_TIE for _, gap in checks.values())
    print(f"float16 bank: {ours32 / best['knn_search float16']:.0%} of the float32 search rate "
          f"({best['FAISS IndexFlatIP float32'] / best['knn_search float16']:.0%} of FAISS float32); neighbours "
          f"{'within' if ok else 'NOT within'} float16 rounding ({FLOAT16_TIE:.1e}) of the exact ones at every rank")
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
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--chunk", type=int, default=4096, help="queries per product (the kNN protocol's query_chunk)")
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--knn-one", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.knn_one:
        return knn_one(args.knn_one, args.bank, args.queries, args.dim, args.k, args.chunk, args.result)
    if args.only in (None, "knn"):
        bench_knn(args.bank, args.queries, args.dim, args.k, args.chunk)
    if args.only in (None, "extract"):
        bench_extract(args.size, 64, 2)


if __name__ == "__main__":
    main()
