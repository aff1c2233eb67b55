#!/usr/bin/env python
"""Images/s of feature extraction and of pretraining on a device, beside the CPU, in one run.

    python bench/throughput.py --device cuda            # the GPU column beside the CPU column
    python bench/throughput.py --device cpu --quick     # what bench/gpu_smoke.sh runs without a GPU

1. extraction: the frozen encoder's forward (ResNet-50 at 224 px, batch 32; `--quick`: ResNet-18 at 64 px)
   under the suite's mixed-precision policy (`backbones.features.encoder_autocast`: bfloat16 or float16 on a
   GPU, float32 on a CPU) and channels_last on CUDA, as `extract_features` runs it; images made once on the
   device, so that the number is the encoder's rate, not the decoder's (bench/frozen.py measures the whole
   extraction path against a plain torchvision loop).
2. pretraining: whole MSBReg training steps of the `demo` config (ResNet-18, K = 4 views of 48 px, batch 32)
   with the trainer's own pieces (view cutting, losses, optimiser, EMA) in the trainer's autocast dtype
   (`amp=bf16` on CUDA), counted in source images per second.
Each rate is the median of `--repeats` timed rounds after one warm-up round; CUDA work is synchronised
before each clock reading.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from backbones.features import encoder_autocast  # noqa: E402
from backbones.resnet import build_backbone  # noqa: E402
from core.distributed import resolve_device  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.methods import build_method  # noqa: E402
from pretrain.model import ema_update  # noqa: E402
from pretrain.optim import build_optimizer  # noqa: E402
from pretrain.train import compute_losses, cut_views  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(device, work, images_per_round, repeats):
    """Median images/s of `work()` over `repeats` rounds after one warm-up round."""
    work()
    _sync(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        _sync(device)
        rates.append(images_per_round / (time.perf_counter() - start))
    return statistics.median(rates)


def extraction_rate(device, arch, size, batch, batches, repeats):
    torch.manual_seed(0)
    model = build_backbone(arch, "torchvision", True).eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def work():
        for _ in range(batches):
            with encoder_autocast(device):
                model(x)

    return rate(device, work, batch * batches, repeats)


def pretraining_rate(device, steps, repeats):
    cfg, _ = load_config("demo")
    torch.manual_seed(0)
    method = build_method(cfg)
    method.to(device)
    opt = build_optimizer(cfg, method.online.named_parameters(), 0.01)
    pairs = method.ema_pairs()
    augs = method.augments()
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None  # the trainer's default amp=bf16 (CUDA only)
    images = (torch.rand(cfg.batch_size, 3, cfg.decode_size, cfg.decode_size) * 255).to(torch.uint8).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    shared = torch.Generator(device=device).manual_seed(1)

    def work():
        for _ in range(steps):
            views = cut_views(cfg, images, augs, g)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, _, _ = compute_losses(method, method.online, views, g, shared)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if pairs is not None:
                ema_update(pairs, 0.99)

    return rate(device, work, cfg.batch_size * steps, repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (the column beside the CPU)")
    p.add_argument("--quick", action="store_true", help="ResNet-18 at 64 px, fewer rounds (smoke runs)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    device = resolve_device(args.device, 1)
    devices = [torch.device("cpu")] + ([device] if device.type != "cpu" else [])
    arch, size, batch, batches = ("resnet18", 64, 32, 2) if args.quick else ("resnet50", 224, 32, 2)
    steps = 1 if args.quick else 3
    print(f"| measured | {' | '.join(str(d) for d in devices)} |" + ("" if len(devices) == 1 else " ratio |"))
    print("| --- |" + " --- |" * (len(devices) + (len(devices) > 1)))
    rows = [(f"extraction images/s ({arch}, {size} px, batch {batch})",
             lambda d: extraction_rate(d, arch, size, batch, batches, args.repeats)),
            ("pretraining images/s (MSBReg demo, K = 4, 48 px, batch 32)",
             lambda d: pretraining_rate(d, steps, args.repeats))]
    for name, measure in rows:
        values = [measure(d) for d in devices]
        ratio = f" {values[-1] / values[0]:.1f}x |" if len(values) > 1 else ""
        print(f"| {name} | {' | '.join(f'{v:.1f}' for v in values)} |{ratio}", flush=True)


if __name__ == "__main__":
    main()
