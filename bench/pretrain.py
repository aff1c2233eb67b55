#!/usr/bin/env python
"""Pretraining speed, measured side by side in one run (ratios, not absolute times, are the result).

    python bench/pretrain.py                       # demo scale (ResNet-18, 48 px) and ResNet-50 at 224 px
    python bench/pretrain.py --only demo --steps 5

1. Per-step time of a training step split into the online forward/backward of the K views, the
   target forward of the K views, and the rest (losses, optimiser, EMA update, glue), for K = 2, 4, 8.
2. Data pipeline images/s at K = 2, 4, 8: decoding happens once per image, the K views are drawn from
   the decoded batch, so only the augmentation part grows with K.
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
from pretrain.model import Online, Target, ema_update, target_pairs  # noqa: E402
from pretrain.optim import LARS, lars_param_groups  # noqa: E402
from pretrain.train import loss_terms, view_augments  # noqa: E402
from datasets.views import make_views  # noqa: E402

SETTINGS = {
    "demo": dict(config="demo", overrides=[], batch=32),
    "r50": dict(config="imagenet_r50_k4", overrides=["data_root=demo", "decode_size=256"], batch=4),
}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def step_split(cfg, batch, steps):
    """Mean seconds per step of (online fwd+bwd, target fwd, rest) after one warm-up step.

    Each part of a real training step is timed once, in training order: target forward, online forward,
    losses, backward, optimiser, EMA update. 'rest' = losses + optimiser + EMA + glue.
    """
    torch.manual_seed(0)
    online = Online(cfg.arch, cfg.proj_hidden, cfg.proj_out, cfg.pred_hidden, cfg.head_norm)
    target = Target(online)
    opt = LARS(lars_param_groups(online.named_parameters()), lr=0.1)
    pairs = target_pairs(target, online)
    images = (torch.rand(batch, 3, cfg.decode_size, cfg.decode_size) * 255).to(torch.uint8)
    augs = view_augments(cfg)
    g = torch.Generator().manual_seed(0)
    totals = {"online": 0.0, "target": 0.0, "rest": 0.0}
    for i in range(steps + 1):
        views = make_views(images, augs, g)
        k, b = views.shape[:2]
        x = views.flatten(0, 1)
        start = time.perf_counter()
        z, t_target = timed(lambda: target(x).view(k, b, -1).transpose(0, 1))
        (p, _), t_fwd = timed(lambda: online(x))
        (loss, _), t_loss = timed(lambda: loss_terms(cfg, p.view(k, b, -1).transpose(0, 1), z, g))
        _, t_bwd = timed(loss.backward)
        _, t_opt = timed(lambda: (opt.step(), opt.zero_grad(set_to_none=True), ema_update(pairs, 0.99)))
        step = time.perf_counter() - start
        if i > 0:
            totals["online"] += t_fwd + t_bwd
            totals["target"] += t_target
            totals["rest"] += step - (t_fwd + t_bwd) - t_target
    return {k: v / steps for k, v in totals.items()}


def pipeline_rate(cfg, k, batch, batches):
    """Images/s of decode (DataLoader, 0 workers) + K augmented views, and of the decode alone."""
    data = SquareImages(pretrain_images(cfg), cfg.decode_size)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False, num_workers=0,
                                         collate_fn=collate_readable)
    cfg.views = k
    cfg.blur_p, cfg.solarize_p = 1.0, 0.2
    augs = view_augments(cfg)
    g = torch.Generator().manual_seed(0)
    t_decode = t_aug = 0.0
    it = iter(loader)
    n = 0
    for _ in range(batches):
        (imgs, _, _), dt = timed(lambda: next(it))
        _, at = timed(lambda: make_views(imgs, augs, g))
        t_decode, t_aug, n = t_decode + dt, t_aug + at, n + len(imgs)
    return n / (t_decode + t_aug), t_decode / n * 1e3, t_aug / n * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=list(SETTINGS))
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    for name, s in SETTINGS.items():
        if args.only and name != args.only:
            continue
        print(f"\n## {name}: {s['config']} (batch {s['batch']} images per step)\n")
        print("| K | step s | online fwd+bwd | target fwd | rest | step / K |")
        print("| --- | --- | --- | --- | --- | --- |")
        for k in (2, 4, 8):
            cfg, _ = load_config(s["config"], s["overrides"] + [f"views={k}", "blur_p=1.0", "solarize_p=0.2"])
            r = step_split(cfg, s["batch"], args.steps)
            step = sum(r.values())
            print(f"| {k} | {step:.3f} | {r['online'] / step:.1%} | {r['target'] / step:.1%} | "
                  f"{r['rest'] / step:.1%} | {step / k:.3f} |", flush=True)
    print("\n## data pipeline (demo images, decode once, K views)\n")
    print("| K | images/s | decode ms/image | augment ms/image |")
    print("| --- | --- | --- | --- |")
    for k in (2, 4, 8):
        cfg, _ = load_config("demo")
        rate, dec, aug = pipeline_rate(cfg, k, 32, 8)
        print(f"| {k} | {rate:.0f} | {dec:.2f} | {aug:.2f} |", flush=True)


if __name__ == "__main__":
    main()
