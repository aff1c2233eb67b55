#!/usr/bin/env python
"""Detection engines side by side: training iterations/s and peak memory of each engine on each recipe.

    python bench/detection.py                          # demo recipe, ResNet-50, both tasks
    python bench/detection.py --recipe full --size 800 --iters 3   # the paper's RoI/proposal settings

Every (task, engine) pair runs in its own process, so that peak memory is that pair's alone: on CUDA
torch.cuda.max_memory_allocated, on CPU the process's peak resident set (ru_maxrss), with the resident
set before the model was built beside it. Both engines get the same protocol (the torchvision model from
tv_engine.build, Detectron2's from d2_engine.make_config), the same synthetic batch (images already at
the training size, so that neither engine resizes), SGD with the protocol's values, randomly initialised
weights. Detectron2 is skipped, with a note, when it does not import.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torchvision  # noqa: E402

from tasks.detection import tv_engine  # noqa: E402
from tasks.detection.recipes import RECIPES  # noqa: E402
from tasks.detection.run import resolve_engine  # noqa: E402
from core.cli import UserError  # noqa: E402

TASKS = tuple(RECIPES)


def bench_protocol(recipe, schedule, size, batch):
    p = recipe.protocol if schedule == "full" else replace(recipe.protocol, **recipe.demo)
    return replace(p, train_sizes=(size,), max_size=2 * size, ims_per_batch=batch, precise_bn_iters=0)


def synthetic_batch(recipe, size, batch, seed=0):
    """Images (3, size, 4/3 size) in [0, 255] with 3 boxes each (filled rectangles as masks for COCO)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size, size * 4 // 3
    out = []
    for _ in range(batch):
        image = torch.rand(3, h, w, generator=g) * 255
        xy = torch.rand(3, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = (0.15 + 0.25 * torch.rand(3, 2, generator=g)) * torch.tensor([w, h])
        boxes = torch.cat([xy, xy + wh], 1).round()
        labels = torch.randint(0, recipe.classes, (3,), generator=g)
        masks = torch.zeros(3, h, w, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        out.append((image, boxes, labels, masks))
    return out


def torchvision_step(recipe, p, arch, batch, device):
    model = tv_engine.build(recipe, torchvision.models.get_model(arch), recipe.classes, p).to(device).train()
    opt = tv_engine.optimizer(model, p)
    images = [im.div(255).to(device) for im, *_ in batch]
    targets = [{"boxes": b.to(device), "labels": (lab + 1).to(device), **({"masks": m.to(device)}
                if recipe.masks else {})} for _, b, lab, m in batch]

    def step():
        loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def detectron2_step(recipe, p, arch, batch, device):
    from detectron2.modeling import build_model
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage

    from tasks.detection import d2_engine

    cfg = d2_engine.make_config(recipe, p, arch, device, 0, tempfile.gettempdir(), "", "bench_train", "bench_test",
                                recipe.classes, world=1)  # no weights: random initialisation
    model = build_model(cfg).train()
    opt = tv_engine.optimizer(model, p)  # the same SGD groups for both engines
    inputs = []
    for image, boxes, labels, masks in batch:
        inst = Instances(image.shape[1:], gt_boxes=Boxes(boxes), gt_classes=labels)
        if recipe.masks:
            inst.gt_masks = BitMasks(masks.bool())
        inputs.append({"image": image, "instances": inst, "height": image.shape[1], "width": image.shape[2]})

    def step():
        with EventStorage():  # Detectron2's models log training statistics into one
            loss = sum(model(inputs).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def measure_one(task, engine, args):
    """Runs in its own process: prints one JSON line with the pair's speed and memory."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    recipe = RECIPES[task]
    p = bench_protocol(recipe, args.recipe, args.size, args.batch)
    batch = synthetic_batch(recipe, args.size, args.batch)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step = (torchvision_step if engine == "torchvision" else detectron2_step)(recipe, p, args.arch, batch, device)
    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"task": task, "engine": engine, "device": device, "iters_per_s": args.iters / seconds,
                      "peak_mb": peak, "rss_before_model_mb": rss_before}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=("demo", "full"), default="demo",
                    help="demo: the demo protocol's proposals and RoIs; full: the paper's "
                         "(tasks/detection/protocol.py)")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=320, help="training image short side (the long side is 4/3 of it)")
    ap.add_argument("--batch", type=int, default=2, help="images per iteration (the protocol's per-GPU share is 2)")
    ap.add_argument("--iters", type=int, default=5, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--one", nargs=2, metavar=("TASK", "ENGINE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return measure_one(*args.one, args)
    try:
        engines = ["torchvision"] + (["detectron2"] if resolve_engine("auto") == "detectron2" else [])
    except UserError as e:
        sys.exit(f"error: {e}")
    if len(engines) == 1:
        print("Detectron2 does not import: only the torchvision engine is measured (README: Detection)")
    print(f"recipe {args.recipe}, {args.arch}, {args.batch} images of {args.size} x {args.size * 4 // 3} per "
          f"iteration, {args.iters} timed iterations after {args.warmup}")
    print("| task | engine | device | iterations/s | peak memory (MB) | before the model (MB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = {}
    for task in args.tasks.split(","):
        for engine in engines:
            cmd = [sys.executable, __file__, "--one", task, engine] + [
                f"--{k}={getattr(args, k)}" for k in ("recipe", "arch", "size", "batch", "iters", "warmup")]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"| {task} | {engine} | failed: {done.stderr.strip().splitlines()[-1]} | | | |")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows[task, engine] = r
            print(f"| {task} | {engine} | {r['device']} | {r['iters_per_s']:.3f} | {r['peak_mb']:.0f} | "
                  f"{r['rss_before_model_mb']:.0f} |", flush=True)
    for task in args.tasks.split(","):
        if (task, "torchvision") in rows and (task, "detectron2") in rows:
            tv, d2 = rows[task, "torchvision"], rows[task, "detectron2"]
            print(f"{task}: torchvision runs at {tv['iters_per_s'] / d2['iters_per_s']:.2f}x Detectron2's speed "
                  f"with {tv['peak_mb'] / d2['peak_mb']:.2f}x its peak memory")


if __name__ == "__main__":
    main()
