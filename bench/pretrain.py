#!/usr/bin/env python
"""Pretraining speed, measured side by side in one run (ratios, not absolute times, are the result).

    python bench/pretrain.py                        # every method at demo scale, views per pass, data pipeline
    python bench/pretrain.py --only methods --steps 5
    python bench/pretrain.py --only r50             # MSBReg with ResNet-50 at 224 px, K = 2, 4, 8

1. methods: for each method's demo config (ResNet-18, 48 px, batch 32), a real training step split into the
   forward passes (online network; target / key encoder), the backward pass, and the rest: the loss itself
   (with W-MSE's whitening, MoCo's queue), the optimiser and the EMA update. The rest must stay <= 10%.
2. views: step time with `view_forward=per_view` (each view alone, BN statistics per view) against
   `one_pass` (all views of one size in one batch), for the methods that have the choice.
3. r50: MSBReg's step split at ResNet-50 / 224 px for K = 2, 4, 8.
4. pipeline: data pipeline images/s at K = 2, 4, 8 (decode once, cut K views).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from datasets.decode import SquareImages, collate_readable  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.data import pretrain_images  # noqa: E402
from pretrain.methods import build_method  # noqa: E402
from pretrain.methods.base import view_augments  # noqa: E402
from pretrain.model import ema_update  # noqa: E402
from pretrain.optim import build_optimizer  # noqa: E402
from pretrain.train import cut_views  # noqa: E402
from datasets.views import make_views  # noqa: E402

METHOD_CONFIGS = ("demo", "demo_byol", "demo_byol_lb", "demo_byol_ls", "demo_byol_uniformity", "demo_byol_multicrop",
                  "demo_simclr", "demo_simclrv2", "demo_mocov2", "demo_barlowtwins", "demo_wmse", "demo_drlim",
                  "demo_cpc")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


class ForwardTimer:
    """Seconds spent inside the forward calls of some modules (the target / key encoder), through hooks."""

    def __init__(self, modules):
        self.total, self._start = 0.0, None
        for m in modules:
            m.register_forward_pre_hook(self.pre)
            m.register_forward_hook(self.post)

    def pre(self, *args):
        self._start = time.perf_counter()

    def post(self, *args):
        self.total += time.perf_counter() - self._start


def step_split(cfg, steps):
    """Mean seconds per step of: online forward, target forward, backward, rest (loss, optimiser, EMA, glue)."""
    torch.manual_seed(0)
    method = build_method(cfg)
    opt = build_optimizer(cfg, method.online.named_parameters(), 0.01)
    pairs = method.ema_pairs()
    timer = ForwardTimer([method.target.backbone, method.target.projector]) if method.target is not None else None
    images = (torch.rand(cfg.batch_size, 3, cfg.decode_size, cfg.decode_size) * 255).to(torch.uint8)
    augs = method.augments()
    g, shared = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    totals = dict.fromkeys(("online", "target", "backward", "rest"), 0.0)
    for i in range(steps + 1):
        views = cut_views(cfg, images, augs, g)
        before = timer.total if timer else 0.0
        start = time.perf_counter()
        out, t_fwd = timed(lambda: method.online(views))
        (loss, _, _), t_loss = timed(lambda: method.loss(out, views, g, shared))
        _, t_bwd = timed(loss.backward)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if pairs is not None:
            ema_update(pairs, 0.99)
        step = time.perf_counter() - start
        t_target = (timer.total - before) if timer else 0.0
        if i > 0:
            totals["online"] += t_fwd
            totals["target"] += t_target
            totals["backward"] += t_bwd
            totals["rest"] += step - t_fwd - t_target - t_bwd
    return {k: v / steps for k, v in totals.items()}


def pipeline_rate(cfg, k, batch, batches):
    """Images/s of decode (DataLoader, 0 workers) + K augmented views, and of the decode alone."""
    data = SquareImages(pretrain_images(cfg), cfg.decode_size)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False, num_workers=0,
                                         collate_fn=collate_readable)
    cfg.blur_p, cfg.solarize_p = 1.0, 0.2
    augs = view_augments(cfg, k=k)
    g = torch.Generator().manual_seed(0)
    t_decode = t_aug = 0.0
    it = iter(loader)
    n = 0
    for _ in range(batches):
        (imgs, _, _), dt = timed(lambda: next(it))
        _, at = timed(lambda: make_views(imgs, augs, g))
        t_decode, t_aug, n = t_decode + dt, t_aug + at, n + len(imgs)
    return n / (t_decode + t_aug), t_decode / n * 1e3, t_aug / n * 1e3


def row(name, r):
    step = sum(r.values())
    return (f"| {name} | {step:.3f} | {r['online'] / step:.1%} | {r['target'] / step:.1%} | "
            f"{r['backward'] / step:.1%} | {r['rest'] / step:.1%} |")


HEADER = ("| setting | step s | online fwd | target fwd | backward | rest (loss, queue, whitening, optimiser, EMA) |\n"
          "| --- | --- | --- | --- | --- | --- |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("methods", "views", "r50", "pipeline"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--configs", default=",".join(METHOD_CONFIGS))
    args = p.parse_args(argv)
    if args.only in (None, "methods"):
        print("\n## every method at demo scale (ResNet-18, 48 px crops, batch 32)\n\n" + HEADER)
        for config in args.configs.split(","):
            cfg, _ = load_config(config)
            print(row(f"`{config}` ({cfg.method}, {len(build_method(cfg).augments())} views)",
                      step_split(cfg, args.steps)), flush=True)
    if args.only in (None, "views"):
        print("\n## views per pass (demo scale): step seconds\n")
        print("| config | per_view | one_pass | one_pass / per_view |\n| --- | --- | --- | --- |")
        for config in ("demo", "demo_byol", "demo_byol_multicrop", "demo_simclr", "demo_barlowtwins", "demo_wmse"):
            times = {}
            for mode in ("per_view", "one_pass"):
                cfg, _ = load_config(config, [f"view_forward={mode}"])
                times[mode] = sum(step_split(cfg, args.steps).values())
            print(f"| `{config}` | {times['per_view']:.3f} | {times['one_pass']:.3f} | "
                  f"{times['one_pass'] / times['per_view']:.2f} |", flush=True)
    if args.only in (None, "r50"):
        print("\n## MSBReg, ResNet-50 at 224 px, batch 4\n\n" + HEADER)
        for k in (2, 4, 8):
            cfg, _ = load_config("imagenet_r50_k4", ["data_root=demo", "decode_size=256", "batch_size=4",
                                                    f"views={k}", "blur_p=1.0", "solarize_p=0.2"])
            print(row(f"K = {k}", step_split(cfg, args.steps)), flush=True)
    if args.only in (None, "pipeline"):
        print("\n## data pipeline (demo images, decode once, K views)\n")
        print("| K | images/s | decode ms/image | augment ms/image |\n| --- | --- | --- | --- |")
        for k in (2, 4, 8):
            cfg, _ = load_config("demo")
            rate, dec, aug = pipeline_rate(cfg, k, 32, 8)
            print(f"| {k} | {rate:.0f} | {dec:.2f} | {aug:.2f} |", flush=True)


if __name__ == "__main__":
    main()
