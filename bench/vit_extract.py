#!/usr/bin/env python
"""ViT-S/16 feature extraction at 224 px: `backbones.features.extract_features` on the suite's ViT encoder (timm's
VisionTransformer with PyTorch's fused attention, the autocast dtype of `backbones.features.autocast_dtype` on a
GPU, channels-last input) beside a plain timm eval loop (timm.create_model, float32, torch.no_grad) on the same
images, transform (Resize 256 bicubic, CenterCrop 224, ImageNet mean/std), batch size and workers.

    python bench/vit_extract.py                      # demo ImageNet images, the machine's device
    python bench/vit_extract.py --images 512 --batch 128 --device cuda

Each loop runs twice, alternating, after a warm-up; the result is the ratio of images/s (ours / plain timm).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_small_patch16_224")
    p.add_argument("--images", type=int, default=64, help="demo images to extract (repeated if the tree is smaller)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    import timm

    from backbones.checkpoints import make_encoder
    from backbones.families import eval_transform
    from backbones.features import autocast_dtype, extract_features
    from datasets.catalog import ensure_demo
    from datasets.imagenet import read_imagenet

    device = torch.device(args.device)
    import dataclasses

    split = read_imagenet(ensure_demo() / "imagenet", "train")
    pick = [i % len(split) for i in range(args.images)]
    split = dataclasses.replace(split, labels=split.labels[pick], paths=[split.paths[i] for i in pick])
    ours_model, info, _ = make_encoder("random", args.arch, seed=0)
    transform = eval_transform(info)
    plain_model = timm.create_model(args.arch, pretrained=False, num_classes=0).eval().to(device)
    plain_model.load_state_dict(ours_model.vit.state_dict())
    n = len(split)

    def plain():
        ds = split.torch_dataset(transform.build())
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, num_workers=args.workers,
                                             collate_fn=lambda b: torch.stack([x for x, _ in b]))
        with torch.no_grad():
            return torch.cat([plain_model(x.to(device)).cpu() for x in loader])

    def ours():
        return extract_features(ours_model, "bench", args.arch, split, transform, device=device,
                                batch_size=args.batch, num_workers=args.workers, use_cache=False,
                                log=lambda *a: None)[0]

    a, b = plain(), ours()  # warm-up; and the two give the same features (float32 on CPU; autocast on GPU)
    tol = 1e-3 if device.type == "cpu" else 5e-2
    print(f"max |ours - plain timm| = {(a - b).abs().max():.2e} (tolerance {tol})")
    rows = []
    for name, fn in (("plain timm loop", plain), ("extract_features (ours)", ours)) * 2:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append((name, n / (time.perf_counter() - t)))
    dtype = str(autocast_dtype(device)).replace("torch.", "") if device.type == "cuda" else "float32"
    fused = all(m.fused_attn for m in ours_model.vit.modules() if hasattr(m, "fused_attn"))
    print(f"\n{args.arch} extraction, {n} images at 224 px, batch {args.batch}, {args.workers} workers, {device} "
          f"(ours: {dtype}, fused attention {fused})")
    print("| loop | images/s (two alternating runs) |")
    print("| --- | --- |")
    for name in ("plain timm loop", "extract_features (ours)"):
        print(f"| {name} | {' / '.join(f'{r:.1f}' for m, r in rows if m == name)} |")
    best = {name: max(r for m, r in rows if m == name) for name, _ in rows}
    print(f"ratio ours / plain timm: {best['extract_features (ours)'] / best['plain timm loop']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
