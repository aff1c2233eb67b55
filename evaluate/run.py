#!/usr/bin/env python
"""Evaluate a checkpoint on transfer tasks and write one result record per task.

    python evaluate/run.py --ckpt r50.pth --task knn_in1k --data-root /data
    python evaluate/run.py --ckpt random --task all --demo
    python evaluate/run.py --inspect moco_v2_800ep_pretrain.pth.tar     # what is in a file, what would be used
    torchrun --nproc_per_node 8 evaluate/run.py --ckpt r50.pth --task linear_places205 --data-root /data

Exit codes: 0 done; 2 a mistake in the command or its inputs (one sentence says which); 1 a bug.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cli import EXIT_USER_ERROR, ArgumentParser, UserError, run_cli  # noqa: E402,F401
from core.files import REPO_ROOT  # noqa: E402


def task_table() -> str:
    from tasks.registry import TASKS

    lines = ["tasks (name: what it measures | data under --data-root | protocol source):"]
    for t in TASKS.values():
        state = "" if t.implemented else " [not implemented yet]"
        lines.append(f"  {t.name}: {t.measures} | {t.needs} | {t.source}{state}")
    return "\n".join(lines)


CHECKPOINT_SET_HELP = ("checkpoint keys: normalize=auto|imagenet|none|MEAN,STD (input normalisation; auto: the "
                       "release's own where known, else the task's), maxpool=true|false (keep the stem's max-pool), "
                       "stem_padding=1|2 (of a 3x3 stem)")


def add_checkpoint_options(p):
    """The options that say which network of a file to take (shared with evaluate/convert.py)."""
    p.add_argument("--arch", help="resnet18, resnet50, ... or a timm ResNet name (default: inferred from the weights; "
                                  "resnet50 for --ckpt random)")
    p.add_argument("--ckpt-key", help="which ResNet of the file to take, by its location as --inspect prints it "
                                      "(e.g. teacher, module.encoder_k, state_dict/momentum_backbone)")
    p.add_argument("--ckpt-part", help="older name of --ckpt-key (e.g. teacher, student, online, target)")
    p.add_argument("--ckpt-format", help="treat the file as this project's release (its evaluation conventions), "
                                         "instead of recognising it")


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=task_table())
    p.add_argument("--ckpt", required=True, help="checkpoint file, or 'random' for a randomly initialised encoder")
    p.add_argument("--task", required=True, help="task name, comma-separated names, or 'all'")
    add_checkpoint_options(p)
    p.add_argument("--data-root", type=Path, help="folder holding the datasets (layouts in README.md)")
    p.add_argument("--demo", action="store_true", help="generate the demo datasets and use each task's demo protocol")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results", help="where records go (default: results/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue tasks that train (SGD linear probes) from their last epoch's checkpoint")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available; under "
                                                   "torchrun: cpu or cuda, one GPU per process)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a protocol value (repeatable); the record marks it as overridden; "
                        + CHECKPOINT_SET_HELP)
    p.add_argument("--inspect", action="store_true", help="print what the checkpoint holds and which ResNet would "
                                                          "be used, then stop (no --task needed)")
    return p.parse_args(argv)


def inspect_main(argv) -> int:
    """`--inspect CKPT`: what the file holds, every ResNet in it, which would be used and why. Kept apart from
    parse_args so that it imports neither the tasks nor torchvision."""
    from backbones.checkpoints import inspect_lines, resolve_settings
    from core.settings import split_assignments

    p = ArgumentParser(description="inspect a checkpoint")
    p.add_argument("--inspect", action="store_true")
    p.add_argument("ckpt_positional", nargs="?")
    p.add_argument("--ckpt")
    p.add_argument("--ckpt-key")
    p.add_argument("--ckpt-part")
    p.add_argument("--ckpt-format")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args, _ = p.parse_known_args(argv)
    ckpt = args.ckpt or args.ckpt_positional
    if not ckpt or ckpt == "random":
        raise UserError("--inspect needs a checkpoint file: --inspect CKPT")
    settings, _ = split_settings(split_assignments(args.overrides, "--set"))
    for line in inspect_lines(ckpt, args.ckpt_format, args.ckpt_key or args.ckpt_part, resolve_settings(settings)):
        print(line)
    return 0


def split_settings(overrides: dict):
    """--set values -> (checkpoint settings, task protocol values)."""
    from backbones.checkpoints import SETTING_KEYS

    return ({k: v for k, v in overrides.items() if k in SETTING_KEYS},
            {k: v for k, v in overrides.items() if k not in SETTING_KEYS})


def select_tasks(spec: str):
    from tasks.registry import TASKS

    names = list(TASKS) if spec == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise UserError(f"unknown task {unknown[0] if unknown else spec!r}; known tasks: {', '.join(TASKS)}")
    if spec != "all":
        for n in names:
            if not TASKS[n].implemented:
                raise UserError(f"task {n} is not implemented yet")
    else:
        skipped = [n for n in names if not TASKS[n].implemented]
        if skipped:
            print(f"--task all: skipping tasks not implemented yet: {', '.join(skipped)}")
        names = [n for n in names if TASKS[n].implemented]
    return [TASKS[n] for n in names]


def supported_tasks(tasks, resolved, checkpoint, all_tasks, say):
    """The tasks the encoder's family supports: `--task all` skips the others with the family's sentence; a
    named unsupported task stops the run with it."""
    from backbones.families import unsupported

    kept = []
    for t, r in zip(tasks, resolved):
        why = unsupported(checkpoint, t.requires)
        if why is None:
            kept.append((t, r))
        elif all_tasks:
            say(f"--task all: skipping {t.name}: {why}")
        else:
            raise UserError(f"{t.name}: {why}")
    return [t for t, _ in kept], [r for _, r in kept]


def parse_overrides(items, tasks):
    from core.settings import keys, split_assignments, unknown_key

    from backbones.checkpoints import SETTING_KEYS

    out = split_assignments(items, "--set")
    valid = sorted({k for t in tasks for k in keys(t.protocol)})
    for key in out:
        if key not in valid and key not in SETTING_KEYS:
            raise unknown_key(key, valid + list(SETTING_KEYS), "--set")
    return out


def resolve_protocols(tasks, overrides, demo):
    """Each task's protocol with --demo's and --set's values, resolved before any work so that a bad value
    stops the run at once."""
    from core.settings import keys, with_overrides, with_preset

    out = []
    for t in tasks:
        mine = {k: v for k, v in overrides.items() if k in keys(t.protocol)}
        published = t.protocol
        if t.presets and "protocol" in mine:  # another source's protocol: its values are the published ones
            published = with_preset(t.protocol, t.presets, mine.pop("protocol"), "--set")
        p = with_overrides(published, t.demo, "demo") if demo else published
        out.append((with_overrides(p, mine, "--set"), published))
    return out


def describe_checkpoint(checkpoint, arch, device, say):
    say(f"checkpoint: {checkpoint.path} (format {checkpoint.format}"
        + (f", {checkpoint.key}, {checkpoint.scheme} names" if checkpoint.key else "") + f"), arch {arch}, "
        f"device {device}")
    if checkpoint.chosen_because and len(checkpoint.candidates) > 1:
        say(f"  chosen: {checkpoint.key} of {len(checkpoint.candidates)} ResNets ({checkpoint.chosen_because})")
    if checkpoint.dropped:
        say("  not taken: " + ", ".join(f"{n} tensors of {g}" for g, n in checkpoint.dropped.items()))
    if checkpoint.foreign:
        say("  read as inert placeholders: " + ", ".join(checkpoint.foreign))
    say(f"  input normalisation: {checkpoint.normalization}")
    for key, note in checkpoint.notes.items():
        say(f"  {key}: {note}")


def main(argv=None) -> int:
    if "--inspect" in (sys.argv[1:] if argv is None else argv):
        return inspect_main(sys.argv[1:] if argv is None else argv)
    from backbones.checkpoints import make_encoder, resolve_settings
    from core import distributed
    from core.settings import as_record
    from datasets.catalog import ensure_demo
    from results import record as records
    from results.report import write_report
    from tasks.context import RunContext

    args = parse_args(argv)
    tasks = select_tasks(args.task)
    checkpoint_values, overrides = split_settings(parse_overrides(args.overrides, tasks))
    settings = resolve_settings(checkpoint_values)
    world = distributed.world_size()
    device = distributed.resolve_device(args.device, world)
    if args.demo:
        data_root = ensure_demo()
    elif args.data_root is None:
        raise UserError("give --data-root DIR with the datasets (layouts in README.md), or --demo")
    elif not args.data_root.is_dir():
        raise UserError(f"--data-root {args.data_root} is not a directory")
    else:
        data_root = args.data_root.resolve()
    resolved = resolve_protocols(tasks, overrides, args.demo)
    protocols = [p for p, _ in resolved]
    if world > 1:
        alone = [t.name for t, p in zip(tasks, protocols) if not t.distributed(p)]
        if alone:
            raise UserError(f"{', '.join(alone)} cannot share its work over processes; run it with plain python")
    device, rank, world = distributed.setup_distributed(device)
    say = print if rank == 0 else (lambda *a, **k: None)

    model, checkpoint, arch = make_encoder(args.ckpt, args.arch, args.seed, args.ckpt_format, args.ckpt_part,
                                           args.ckpt_key, settings)
    describe_checkpoint(checkpoint, arch, device, say)
    tasks, resolved = supported_tasks(tasks, resolved, checkpoint, args.task == "all", say)
    ctx = RunContext(model, checkpoint, arch, data_root, device, args.seed, args.demo, args.out, args.resume, say,
                     rank, world, args.device)
    command = "evaluate/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for t, (p, published) in zip(tasks, resolved):
        say(f"[{t.name}]{' (demo protocol)' if args.demo else ''}")
        started = time.time()
        out = t.run(ctx, p)
        if rank != 0:
            continue  # rank 0 writes the records
        record = records.build_record(
            task=t.name, demo=args.demo, metrics=out.metrics, engine=out.engine, probe=out.probe,
            data={"dataset": getattr(p, "dataset", None), "root": str(data_root), **out.info},
            protocol=as_record(p, published, t.presets), checkpoint=checkpoint.describe(), arch=arch, seed=args.seed,
            device=str(device), command=command, started=started)
        path = records.write_record(args.out, record, out.artifacts)
        for name, value in out.metrics.items():
            print(f"  {name} = {value:.2f}")
        print(f"  record: {path}")
    distributed.shutdown()
    if rank != 0:
        return 0
    summary = records.write_summary(args.out)
    print(f"summary: {summary}")
    written, _ = write_report(args.out, args.out / "tables")
    print(f"tables: {args.out / 'tables'} ({len(written)} files; python evaluate/report.py --records {args.out} "
          "rebuilds them)")
    return 0


def cli(argv=None) -> int:
    """main() with the exit-code contract: 2 and one sentence for the user's mistakes."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
