#!/usr/bin/env python
"""Images/s of a probe's training loader over a few short epochs: the loader rebuilt every epoch (as before)
beside the suite's one loader through all epochs (core.loading), in one run.

    python bench/loaders.py                          # --device: cuda when there is one, else cpu
    python bench/loaders.py --device cpu --epochs 4 --batches 8 --images 256

The images are JPEG files written to a temporary folder (--images of --size px, random smooth colours) and
decoded by the suite's reader (`datasets.decode.ImageSamples`) under a probe's training transform
(`tasks.classifier_training.train_transform`: RandomResizedCrop to --crop px, flip, ToTensor, Normalize),
every image's augmentation seeded by (seed, epoch, index) (`core.sampling.SeededSamples`). An epoch is
--batches batches of --images / --batches images: the shape of a probe on a small dataset, where starting
the loading processes is a large part of an epoch. Three (or four) ways of loading --epochs epochs:
  a. before: a new DataLoader every epoch with --workers-old processes, not persistent, no pinned memory;
  b. the suite's: one DataLoader whose sampler (`core.sampling.SeededBatches`) spans all epochs, so that its
     workers start once, with `core.loading.loader_options(device, resolve_workers("auto"), reused=False)`,
     as `tasks.classifier_training.probe_batches` builds it (pinned memory on CUDA);
  c. one DataLoader with persistent workers (`loader_options(..., reused=True)`), iterated once per epoch;
  a'. (when resolve_workers("auto") differs from --workers-old) a with the suite's worker count, so that
     b/a' is the gain of starting the workers once alone, apart from the worker count.
Nothing trains here: the main process only waits for batches, so a core that resolve_workers keeps for the
training process (one of 2 on a 2-core machine) is idle, and a with 2 workers can beat b and c with 1.
On CUDA every batch is also copied to the device (non_blocking from pinned memory in b and c).
All ways are first checked to deliver the same images, batch for batch. Then each is timed --repeats times
(interleaved, from building the loader to the last batch on the device); the fastest round of each (the one
least disturbed by other processes on the machine) is printed as images/s, with the worker counts and the
ratios b/a and c/a (and b/a', c/a'). Absolute rates depend on the machine; the ratios are the result.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from core.loading import available_cores, loader_options, resolve_workers  # noqa: E402
from core.sampling import SeededBatches, SeededSamples  # noqa: E402
from datasets.base import ClassificationSplit  # noqa: E402
from datasets.decode import collate_readable  # noqa: E402
from tasks.classifier_training import train_transform  # noqa: E402

SEED = 0
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_jpegs(folder: Path, n: int, size: int) -> ClassificationSplit:
    """n JPEG files of size x size px (smooth random colours with some noise, so that they decode like photos)."""
    rng = np.random.default_rng(SEED)
    paths = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3))
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return ClassificationSplit("synthetic", "train", ["any"], np.zeros(n, dtype=np.int64), paths=paths)


def rebuilt_per_epoch(samples, n, batch, epochs, device, workers):
    """a. A new loader for each epoch, `workers` processes started each time, nothing pinned."""
    steps = SeededBatches(n, batch, SEED, drop_last=False).steps_per_epoch
    for epoch in range(epochs):
        sampler = SeededBatches(n, batch, SEED, epoch * steps, (epoch + 1) * steps, drop_last=False)
        loader = torch.utils.data.DataLoader(samples, batch_sampler=sampler, collate_fn=collate_readable,
                                             num_workers=workers)
        for images, _, _ in loader:
            yield images.to(device)


def one_sampler_for_all_epochs(samples, n, batch, epochs, device, workers):
    """b. probe_batches' loader: one sampler over every step of every epoch, one iterator, workers started once."""
    sampler = SeededBatches(n, batch, SEED, drop_last=False)
    sampler.start, sampler.stop = 0, epochs * sampler.steps_per_epoch
    loader = torch.utils.data.DataLoader(samples, batch_sampler=sampler, collate_fn=collate_readable,
                                         **loader_options(device, workers, reused=False))
    batches = iter(loader)
    for _ in range(epochs):
        for _ in range(sampler.steps_per_epoch):
            images, _, _ = next(batches)
            yield images.to(device, non_blocking=True)


def persistent_workers(samples, n, batch, epochs, device, workers):
    """c. One loader with persistent workers, iterated once per epoch (its sampler moved to the epoch's steps;
    the main process samples, so the workers need not know)."""
    sampler = SeededBatches(n, batch, SEED, drop_last=False)
    steps = sampler.steps_per_epoch
    loader = torch.utils.data.DataLoader(samples, batch_sampler=sampler, collate_fn=collate_readable,
                                         **loader_options(device, workers, reused=True))
    for epoch in range(epochs):
        sampler.start, sampler.stop = epoch * steps, (epoch + 1) * steps
        for images, _, _ in loader:
            yield images.to(device, non_blocking=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(way, device):
    """(seconds, images) from building the loader to the last batch on the device."""
    _sync(device)
    start = time.perf_counter()
    count = sum(len(images) for images in way())
    _sync(device)
    return time.perf_counter() - start, count


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batches", type=int, default=8, help="batches per epoch")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=96, help="side of the JPEG files, px")
    p.add_argument("--crop", type=int, default=64, help="RandomResizedCrop output, px")
    p.add_argument("--workers-old", type=int, default=2, help="loading processes of the per-epoch loader (a)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    batch = args.images // args.batches
    new_workers = resolve_workers("auto")
    protocol = SimpleNamespace(crop=args.crop, train_crop_scale_min=0.08, interpolation="bilinear")
    with tempfile.TemporaryDirectory(prefix="bench-loaders-") as folder:
        split = write_jpegs(Path(folder), args.images, args.size)
        samples = SeededSamples(split.torch_dataset(train_transform(protocol, IMAGENET_MEAN, IMAGENET_STD)), SEED)

        def way(build, workers):
            return lambda: build(samples, args.images, batch, args.epochs, device, workers)

        ways = {"a. rebuilt every epoch": (way(rebuilt_per_epoch, args.workers_old), args.workers_old),
                "b. one sampler, all epochs": (way(one_sampler_for_all_epochs, new_workers), new_workers),
                "c. persistent workers": (way(persistent_workers, new_workers), new_workers)}
        if new_workers != args.workers_old:
            ways["a'. rebuilt every epoch"] = (way(rebuilt_per_epoch, new_workers), new_workers)
        reference = None
        for name, (run, _) in ways.items():
            got = [images.cpu() for images in run()]
            if reference is None:
                reference = got
            elif len(got) != len(reference) or not all(torch.equal(x, y) for x, y in zip(got, reference)):
                sys.exit(f"{name} delivered other images than {next(iter(ways))}")
        print(f"checked: the {len(ways)} ways deliver the same {sum(map(len, reference))} images "
              f"({args.epochs} epochs x {len(reference) // args.epochs} batches of {batch})")
        seconds = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, (run, _) in ways.items():
                elapsed, count = timed(run, device)
                seconds[name].append(elapsed)
    print(f"device {device}, {available_cores()} cores; {args.images} JPEGs of {args.size} px, crop {args.crop} px, "
          f"fastest of {args.repeats} rounds")
    print("| loading | workers | images/s | vs a |")
    print("| --- | --- | --- | --- |")
    rates = {name: count / min(s) for name, s in seconds.items()}
    base = rates[next(iter(ways))]
    for name, (_, workers) in ways.items():
        print(f"| {name} | {workers} | {rates[name]:.0f} | {rates[name] / base:.2f}x |")
    same = rates.get("a'. rebuilt every epoch")
    if same is not None:
        print(f"at {new_workers} worker(s) each: b/a' {rates['b. one sampler, all epochs'] / same:.2f}x, "
              f"c/a' {rates['c. persistent workers'] / same:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
