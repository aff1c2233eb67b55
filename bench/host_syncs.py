#!/usr/bin/env python
"""ms per training step of a classifier probe that reads its loss and accuracy to the host every step (as
before) beside one that sums them on the device and reads them once (tasks.classifier_training.EpochTotals),
in one run; and the host reads per step of the suite's own pretraining loop.

    python bench/host_syncs.py                       # --device: cuda when there is one, else cpu
    python bench/host_syncs.py --device cuda --steps 50 --batch 128 --size 64

1. The probe: a ResNet-18 (backbones.resnet.build_backbone) and a linear head, finetuned with SGD as
   `tasks.classifier_training.Probe` runs it (the encoder under the suite's autocast), on random images made
   once on the device (--batch images of --size px per step, so that no loading is timed). Two ways:
     a. `loss.item()` and `int(correct)` read every step (a host sync each on a GPU);
     b. `EpochTotals.add` every step, `EpochTotals.history_entry` once at the end (two reads in all).
   Both start from the same seed and are first checked to end with the same weights and the same epoch loss
   and accuracy. Then each is timed --repeats times (interleaved; the fastest round, the one least disturbed
   by other processes, counts) over --steps steps after the check's warm-up. Printed: ms/step of each and the
   ratio a/b. On a CPU the ratio is expected near 1.0: .item() waits for work that has already run, there is
   no device queue to drain. On CUDA the synchronisations of each way are also counted
   (torch.cuda.set_sync_debug_mode("warn"), one warning each) and printed per step.
2. The suite's own loop: `pretrain.train.train` with the demo config (MSBReg, 2 views of 16 px, batch 8, as
   tests/test_pretrain.py's test_no_host_read_per_training_step runs it, on the demo ImageNet written to a
   temporary folder) for 2 and for 5 steps, logged and saved once at the end. Counted: the calls of
   Tensor.item / tolist / __int__ / __float__ / __index__ made by the code of pretrain/ and
   tasks/classifier_training.py (like the tests' `host_reads` fixture). Printed: the reads per training step
   (the difference of the two runs over 3 steps; 0 expected) and the reads of the logging and saving at
   the end. On the CPU, with --device for the probe only; --skip-suite leaves this part out.
"""
import argparse
import contextlib
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from backbones.resnet import build_backbone  # noqa: E402
from tasks.classifier_training import EpochTotals, Probe  # noqa: E402

SEED = 0
CLASSES = 10
LR = 0.01
REPO = Path(__file__).resolve().parents[1]


def make_probe(device):
    torch.manual_seed(SEED)
    encoder = build_backbone("resnet18").to(device)
    probe = Probe(encoder, nn.Linear(512, CLASSES).to(device)).train()
    return probe, torch.optim.SGD(probe.parameters(), lr=LR, momentum=0.9)


def make_data(device, steps, batch, size):
    g = torch.Generator().manual_seed(SEED)
    images = torch.randn(steps, batch, 3, size, size, generator=g).to(device)
    targets = torch.randint(0, CLASSES, (steps, batch), generator=g).to(device)
    return images, targets


def train_step(probe, opt, images, target):
    """One SGD step on the mean cross-entropy of the batch; (loss, logits)."""
    logits = probe(images)
    loss = F.cross_entropy(logits.float(), target, reduction="sum") / len(target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss, logits


def read_every_step(probe, opt, images, targets):
    """a. The loss and the number correct read to the host after every step."""
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in zip(images, targets):
        loss, logits = train_step(probe, opt, x, y)
        loss_sum += loss.item() * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(y)
    return {"train_loss": loss_sum / seen, "train_top1": 100.0 * correct / seen}


def read_once(probe, opt, images, targets):
    """b. The loss and the number correct summed on the device, read once at the end (EpochTotals)."""
    totals = EpochTotals(images.device)
    for x, y in zip(images, targets):
        loss, logits = train_step(probe, opt, x, y)
        totals.add(loss, len(y), 1, logits, y)
    entry = totals.history_entry(0, LR, images.device)
    return {k: entry[k] for k in ("train_loss", "train_top1")}


WAYS = {"a. read every step": read_every_step, "b. read once (EpochTotals)": read_once}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_same(device, images, targets):
    """Both ways from the same seed: the same weights, loss and accuracy. Returns the trained (probe, opt)s."""
    runs = {}
    for name, way in WAYS.items():
        probe, opt = make_probe(device)
        runs[name] = (probe, opt, way(probe, opt, images, targets))
    (pa, _, ea), (pb, _, eb) = runs.values()
    exact = device.type == "cpu"  # cuDNN's kernels are not bit-reproducible from run to run
    for (key, a), b in zip(pa.state_dict().items(), pb.state_dict().values()):
        if exact and not torch.equal(a, b):
            sys.exit(f"the two ways end with different {key}")
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=f"the two ways end with different {key}")
    assert abs(ea["train_loss"] - eb["train_loss"]) <= 1e-5 * abs(ea["train_loss"]), (ea, eb)
    assert exact is False or ea["train_top1"] == eb["train_top1"], (ea, eb)
    print(f"checked: both ways end with the same weights, loss {ea['train_loss']:.4f} ({eb['train_loss']:.4f}) "
          f"and top-1 {ea['train_top1']:.2f} ({eb['train_top1']:.2f}) after {len(images)} steps")
    return {name: run[:2] for name, run in runs.items()}


def count_syncs(device, way, *args):
    """Synchronising CUDA calls made by way(*args), one warning each under set_sync_debug_mode("warn")."""
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            way(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@contextlib.contextmanager
def counting_host_reads():
    """Counts Tensor.item / tolist / __int__ / __float__ / __index__ called directly from pretrain/ or
    tasks/classifier_training.py (tests/test_pretrain.py's `host_reads` fixture)."""
    counted = {"n": 0}
    ours = (str(REPO / "pretrain"), str(REPO / "tasks" / "classifier_training.py"))
    names = ("item", "tolist", "__int__", "__float__", "__index__")
    real = {name: getattr(torch.Tensor, name) for name in names}

    def counting(real_method):
        def method(self, *a, **k):
            if sys._getframe(1).f_code.co_filename.startswith(ours):
                counted["n"] += 1
            return real_method(self, *a, **k)
        return method

    for name in names:
        setattr(torch.Tensor, name, counting(real[name]))
    try:
        yield counted
    finally:
        for name in names:
            setattr(torch.Tensor, name, real[name])


def suite_host_reads():
    """(reads per training step, reads of a 2-step run) of pretrain.train.train on the demo config, tiny."""
    from datasets import imagenet
    from datasets.catalog import SUBDIRS
    from pretrain import train as train_mod
    from pretrain.config import load_config

    with tempfile.TemporaryDirectory(prefix="bench-host-syncs-") as tmp:
        imagenet.write_demo(Path(tmp) / "data" / SUBDIRS["imagenet"], SEED)
        over = [f"data_root={tmp}/data", "device=cpu", "crop_size=16", "batch_size=8", "epochs=1", "workers=0",
                "warmup_epochs=0", "views=2", "proj_hidden=32", "proj_out=16", "pred_hidden=32",
                "log_every_steps=1000", "save_every_steps=1000"]  # tests/test_pretrain.py's tiny_overrides
        reads = {}
        for steps in (2, 5):
            cfg, _ = load_config("demo", over + [f"max_steps={steps}", f"out_dir={tmp}/run{steps}"])
            with counting_host_reads() as counted, contextlib.redirect_stderr(io.StringIO()):  # its progress bar
                train_mod.train(cfg, "demo", log=lambda *a: None)
            reads[steps] = counted["n"]
    return (reads[5] - reads[2]) / 3, reads[2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32, help="input side, px")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-suite", action="store_true", help="leave out the count of the pretraining loop's reads")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train_and_score sets it
    images, targets = make_data(device, args.steps, args.batch, args.size)
    trained = check_same(device, images[:3], targets[:3])  # also the warm-up
    seconds = {name: [] for name in WAYS}
    for _ in range(args.repeats):
        for name, way in WAYS.items():
            probe, opt = trained[name]
            _sync(device)
            start = time.perf_counter()
            way(probe, opt, images, targets)
            _sync(device)
            seconds[name].append(time.perf_counter() - start)
    ms = {name: min(s) / args.steps * 1e3 for name, s in seconds.items()}
    syncs = {}
    if device.type == "cuda":
        for name, way in WAYS.items():
            syncs[name] = count_syncs(device, way, *trained[name], images, targets) / args.steps
    print(f"device {device}; ResNet-18 + linear head, batch {args.batch} at {args.size} px, {args.steps} steps, "
          f"fastest of {args.repeats} rounds")
    print("| host reads | ms/step |" + (" syncs/step |" if syncs else ""))
    print("| --- | --- |" + (" --- |" if syncs else ""))
    for name in WAYS:
        print(f"| {name} | {ms[name]:.1f} |" + (f" {syncs[name]:.2f} |" if syncs else ""))
    (a, b) = ms.values()
    print(f"ratio a/b: {a / b:.2f}x" + ("  (a CPU has no device queue for .item() to wait on: near 1.0 expected)"
                                        if device.type == "cpu" else ""))
    if not args.skip_suite:
        per_step, at_end = suite_host_reads()
        print(f"suite's pretraining loop (pretrain.train.train, demo config, tiny, CPU): {per_step:g} host reads per "
              f"training step; {at_end} in a 2-step run (its one log, NaN check and save at the end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
