#!/usr/bin/env python
"""Evaluate a checkpoint on transfer tasks and write one result record per task.

    python evaluate/run.py --ckpt r50.pth --task knn_in1k --data-root /data
    python evaluate/run.py --ckpt random --task all --demo
    python evaluate/run.py --ckpt runs/demo/ --task knn_stl10,linear_stl10 --demo   # every epoch of a run
    python evaluate/run.py --ckpt 'zoo/*.pth' --task knn_in1k --seeds 0,1,2 --data-root /data
    python evaluate/run.py --ckpt runs/r50/ --task all --launcher slurm --partition gpu --gpus-per-job 1 --wait
    python evaluate/run.py --inspect moco_v2_800ep_pretrain.pth.tar     # what is in a file, what would be used
    torchrun --nproc_per_node 8 evaluate/run.py --ckpt r50.pth --task linear_places205 --data-root /data

Exit codes: 0 done; 2 a mistake in the command or its inputs (one sentence says which); 1 a bug.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cli import EXIT_USER_ERROR, ArgumentParser, UserError, run_cli  # noqa: E402,F401
from core.files import REPO_ROOT, remove_leftovers  # noqa: E402


def task_table() -> str:
    from tasks.registry import TASKS

    lines = ["tasks (name: what it measures | data under --data-root | protocol source):"]
    for t in TASKS.values():
        lines.append(f"  {t.name}: {t.measures} | {t.needs} | {t.source}")
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
                       epilog=task_table(), allow_abbrev=False)
    p.add_argument("--ckpt", required=True, action="append",
                   help="checkpoint files (comma-separated or the option repeated), a folder (a run folder of "
                        "epoch checkpoints is read in epoch order), a quoted glob, or 'random' for a randomly "
                        "initialised encoder")
    p.add_argument("--task", required=True, help="task name, comma-separated names, or 'all'")
    add_checkpoint_options(p)
    p.add_argument("--data-root", type=Path, help="folder holding the datasets (layouts in README.md)")
    p.add_argument("--demo", action="store_true", help="generate the demo datasets and use each task's demo protocol")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results", help="where records go (default: results/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", help="several trials, e.g. 0,1,2: each task runs once per seed; the record keeps "
                                   "each trial and their mean and std (default: --seed)")
    p.add_argument("--resume", action="store_true",
                   help="continue the tasks that train (SGD probes, semi-supervised finetuning, detection) from their "
                        "last checkpoint; under Slurm a requeued job adds it itself")
    p.add_argument("--force", action="store_true", help="redo runs that have a record already (default: a run "
                                                        "whose checkpoint, task, protocol, seeds and --demo match "
                                                        "a record is skipped)")
    p.add_argument("--sanity", action="store_true",
                   help="before the tasks, a quick kNN on a small subset beside a random encoder of the same "
                        "architecture; warns when the checkpoint is no better")
    p.add_argument("--no-report", action="store_true",
                   help="do not rebuild the tables and plots at the end (python evaluate/report.py does)")
    p.add_argument("--wandb", metavar="PROJECT", help="log each record's metrics and protocol to Weights & Biases "
                                                      "(optional: pip install wandb; WANDB_MODE=offline works)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available; under "
                                                   "torchrun: cpu or cuda, one GPU per process)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a protocol value (repeatable); the record marks it as overridden; "
                        + CHECKPOINT_SET_HELP)
    p.add_argument("--inspect", action="store_true", help="print what the checkpoint holds and which ResNet would "
                                                          "be used, then stop (no --task needed)")
    from evaluate.launch import add_launcher_options

    add_launcher_options(p)
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
    return [TASKS[n] for n in names]


def supported_tasks(todo, checkpoint, all_tasks, say):
    """The work items [(task, ...)] the encoder's family supports: `--task all` skips the others with the
    family's sentence; a named unsupported task stops the run with it (backbones.families, the encoder-family
    seam)."""
    from backbones.families import unsupported

    kept = []
    for item in todo:
        why = unsupported(checkpoint, getattr(item[0], "requires", ()))
        if why is None:
            kept.append(item)
        elif all_tasks:
            say(f"--task all: skipping {item[0].name}: {why}")
        else:
            raise UserError(f"{item[0].name}: {why}")
    return kept


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


def precision_of(out, device) -> str:
    """The autocast dtype the task ran its encoder in: the task's word when it gives one, else the suite's one
    mixed-precision policy (backbones.features.autocast_dtype on a GPU, float32 on a CPU)."""
    from backbones.features import autocast_dtype

    given = out.info.get("precision") or out.probe.get("precision")
    if given:
        return str(given)
    return str(autocast_dtype(device)).removeprefix("torch.") if device.type == "cuda" else "float32"


def checkpoint_id(ckpt, arch, seed) -> str:
    """What names an encoder in run keys: the file's sha256, or the random encoder's id (arch and seed)."""
    from core.files import sha256_of

    return f"random:{arch or 'resnet50'}:seed{seed}" if ckpt.random else sha256_of(ckpt.path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--inspect" in argv:
        return inspect_main(argv)
    from backbones.checkpoints import resolve_settings
    from core import distributed
    from core.settings import as_record
    from evaluate.plan import expand_checkpoints, parse_seeds
    from results import record as records

    args = parse_args(argv)
    tasks = select_tasks(args.task)
    checkpoint_values, overrides = split_settings(parse_overrides(args.overrides, tasks))
    settings = resolve_settings(checkpoint_values)
    seeds = parse_seeds(args.seeds, args.seed)
    if args.launcher == "slurm":  # a bad Slurm setting stops the command before any work
        from evaluate.launch import executor_parameters, slurm_settings

        executor_parameters(slurm_settings(args))
    ckpts = expand_checkpoints(args.ckpt)
    world = distributed.world_size()
    device = distributed.resolve_device(args.device, world)
    if args.demo:
        from datasets.catalog import ensure_demo

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
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 alone writes and speaks
    say = print if rank0 else (lambda *a, **k: None)
    for path in remove_leftovers(args.out / "records") if rank0 else []:
        say(f"removed a half-written record left by a killed process: {path}")
    finished = {} if args.force else records.finished_runs(args.out)
    selection = {"arch": args.arch, "ckpt_key": args.ckpt_key or args.ckpt_part, "ckpt_format": args.ckpt_format,
                 "settings": checkpoint_values}
    work, skipped = [], 0
    for ckpt in ckpts:
        ident = checkpoint_id(ckpt, args.arch, seeds[0])
        todo = []
        for t, (p, published) in zip(tasks, resolved):
            protocol = as_record(p, published, t.presets)
            key = records.make_run_key(checkpoint_id=ident, task=t.name, protocol_values=records.protocol_values(
                protocol), seeds=seeds, demo=args.demo, selection=selection)
            done = finished.get(records.run_key_text(key))
            if done is not None:
                say(f"[{t.name}] {ckpt.path}: skipped, its record exists ({done}); --force redoes it")
                skipped += 1
            else:
                todo.append((t, p, protocol, key))
        if todo:
            work.append((ckpt, todo))
    if args.launcher == "slurm":
        from evaluate.launch import submit

        return submit(args, argv, [(ckpt, [t.name for t, _, _, _ in todo]) for ckpt, todo in work])
    tracker = None
    if args.wandb:
        from results.tracking import WandbTracker

        tracker = WandbTracker(args.wandb, args.out / "state" / "wandb")
    command = "evaluate/run.py " + " ".join(argv)
    written = 0
    if work:
        device, rank, world = distributed.setup_distributed(device)
        for ckpt, todo in work:
            written += evaluate_checkpoint(args, ckpt, todo, seeds, settings, data_root, device, rank, world, say,
                                           command, tracker)
    distributed.shutdown()
    if not rank0:
        return 0
    if not written:
        print(f"nothing new: all {skipped} runs of this command have records in {args.out / 'records'} "
              "(--force redoes them)")
        return 0
    print(f"summary: {records.write_summary(args.out)}")
    if args.no_report:
        print(f"tables: not rebuilt (--no-report); python evaluate/report.py --records {args.out} builds them")
    else:
        from results.report import write_report

        files, _, notes = write_report(args.out, args.out / "tables")
        for note in notes:
            print(f"  {note}")
        print(f"tables: {args.out / 'tables'} ({len(files)} files; python evaluate/report.py --records "
              f"{args.out} rebuilds them)")
    return 0


def evaluate_checkpoint(args, ckpt, todo, seeds, settings, data_root, device, rank, world, say, command,
                        tracker) -> int:
    """Run `todo` [(task, protocol, protocol record, run key)] on one checkpoint, once per seed; write one record
    per task (rank 0). Returns the number of records written."""
    from backbones.checkpoints import make_encoder
    from results import record as records
    from tasks.context import RunContext

    model, checkpoint, arch = make_encoder(ckpt.path, args.arch, seeds[0], args.ckpt_format, args.ckpt_part,
                                           args.ckpt_key, settings)
    describe_checkpoint(checkpoint, arch, device, say)
    todo = supported_tasks(todo, checkpoint, args.task == "all", say)
    if ckpt.epoch is not None:
        say(f"  epoch {ckpt.epoch} (from the file name)")
    if args.sanity and ckpt.random:
        say("sanity: --ckpt random is the random encoder the check compares with; nothing to check")
    elif args.sanity:
        from evaluate.sanity import sanity_check

        sanity_check(model, checkpoint, arch, [t for t, _, _, _ in todo], [p for _, p, _, _ in todo], data_root,
                     device, say, rank, world, args.demo)
    written = 0
    for t, p, protocol, key in todo:
        started, trials, out = time.time(), [], None
        section = records.checkpoint_section(checkpoint.describe(), ckpt.epoch)
        run = None
        if tracker is not None and rank == 0:  # opened before the work, so a requeued job reopens the same run
            run = tracker.start(key, f"{t.name}:{Path(checkpoint.path).name}",
                                tracker.config(t.name, protocol, section, seeds, args.demo))
        try:
            for seed in seeds:
                say(f"[{t.name}]{' (demo protocol)' if args.demo else ''}{f' seed {seed}' if len(seeds) > 1 else ''}")
                ctx = RunContext(model, checkpoint, arch, data_root, device, seed, args.demo, args.out, args.resume,
                                 say, rank, world, args.device)
                out = t.run(ctx, p)
                trials.append({"seed": seed, "metrics": out.metrics})
        except BaseException:  # a failure or a preemption: the W&B run ends unfinished; a rerun continues it
            if run is not None:
                run.finish(exit_code=1)
            raise
        if rank != 0:
            continue  # rank 0 writes the records
        record = records.build_record(
            task=t.name, demo=args.demo, trials=trials, engine=out.engine, probe=out.probe,
            data={"dataset": getattr(p, "dataset", None), "root": str(data_root), **out.info},
            protocol=protocol, checkpoint=section, arch=arch,
            device=str(device), command=command, started=started, precision=precision_of(out, device),
            run_key=key)
        path = records.write_record(args.out, record, out.artifacts)
        std = record.get("metrics_std") or {}
        for name, value in record["metrics"].items():
            print(f"  {name} = {value:.2f}" + (f" ± {std[name]:.2f} (n={len(trials)})" if name in std else ""))
        print(f"  record: {path}")
        if run is not None:
            print(f"  wandb: run {tracker.finish(run, record, path)} ({args.wandb})")
        written += 1
    return written


def cli(argv=None) -> int:
    """main() with the exit-code contract: 2 and one sentence for the user's mistakes."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
