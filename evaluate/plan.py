"""Which checkpoints one `evaluate/run.py` command evaluates, and which of its runs are finished already.

`--ckpt` takes files (comma-separated or the option repeated), folders and globs. A folder of epoch
checkpoints (a pretraining run) is read in epoch order; the names recognised are this suite's
(`backbone_epoch0003.pth`, pretrain/train.py) and the common ones of the projects whose releases the suite
reads:

    checkpoint_0099.pth.tar    MoCo v1/v2/v3 (main_moco.py: 'checkpoint_{:04d}.pth.tar'.format(epoch))
    checkpoint0100.pth         DINO / iBOT (main_dino.py: f'checkpoint{epoch:04}.pth')
    epoch=9-step=1000.ckpt     PyTorch Lightning's ModelCheckpoint default ('{epoch}-{step}'; solo-learn)
    model_phase99.torch        VISSL (checkpoints per phase: 'model_phase{N}.torch')

The epoch is the number in the name, as the project wrote it (MoCo and Lightning count from 0; the suite's
own name counts epochs done). When a folder holds epoch files, its other checkpoints (`last.pth`,
`backbone.pth`, DINO's `checkpoint.pth`) are copies of one of them and are skipped with one line saying so;
a folder without epoch files gives every checkpoint file in name order.
"""
import glob
import re
from dataclasses import dataclass
from pathlib import Path

from core.cli import UserError

EPOCH_NAMES = (
    ("this suite", re.compile(r"^backbone_epoch(\d+)\.pth$")),
    ("MoCo", re.compile(r"^checkpoint_(\d+)\.pth\.tar$")),
    ("DINO", re.compile(r"^checkpoint(\d+)\.pth$")),
    ("Lightning", re.compile(r"^epoch=(\d+)(?:-step=\d+)?\.ckpt$")),
    ("VISSL", re.compile(r"^model_(?:final_checkpoint_)?phase(\d+)\.torch$")),
)
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pth.tar", ".tar", ".ckpt", ".torch", ".pkl", ".bin", ".safetensors")


@dataclass(frozen=True)
class CheckpointFile:
    path: str  # a file path, or "random"
    epoch: int = None  # from the file name (EPOCH_NAMES), when it gives one

    @property
    def random(self) -> bool:
        return self.path == "random"


def epoch_of(name: str):
    """The epoch an epoch-named checkpoint's file name gives (EPOCH_NAMES), else None."""
    for _, pattern in EPOCH_NAMES:
        m = pattern.match(name)
        if m:
            return int(m.group(1))
    return None


def is_checkpoint_name(name: str) -> bool:
    return not name.startswith(".") and name.endswith(CHECKPOINT_SUFFIXES)


def _in_epoch_order(paths, say, where):
    """Epoch files first, in epoch order; the others skipped with one line when any epoch file is present."""
    epoch_files = sorted(((epoch_of(p.name), p) for p in paths if epoch_of(p.name) is not None),
                         key=lambda e: (e[0], e[1].name))
    if not epoch_files:
        return [CheckpointFile(str(p)) for p in sorted(paths)]
    others = sorted(p.name for p in paths if epoch_of(p.name) is None)
    if others:
        say(f"{where}: skipping {', '.join(others)}: the folder holds epoch checkpoints ({len(epoch_files)}, "
            f"epochs {epoch_files[0][0]}-{epoch_files[-1][0]}), and a file without an epoch in its name is a "
            "copy of one of them (give it by name to evaluate it)")
    return [CheckpointFile(str(p), e) for e, p in epoch_files]


def expand_checkpoints(specs, say=print) -> list:
    """--ckpt values (each may hold several, comma-separated) -> [CheckpointFile], in order, without repeats."""
    out = []
    for spec in specs:
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                continue
            if item == "random":
                out.append(CheckpointFile("random"))
            elif any(c in item for c in "*?["):
                hits = [Path(p) for p in glob.glob(item) if Path(p).is_file() and is_checkpoint_name(Path(p).name)]
                if not hits:
                    raise UserError(f"--ckpt {item} matches no checkpoint file")
                out += _in_epoch_order(hits, say, f"--ckpt {item}")
            elif Path(item).is_dir():
                hits = [p for p in Path(item).iterdir() if p.is_file() and is_checkpoint_name(p.name)]
                if not hits:
                    raise UserError(f"--ckpt {item} is a folder without checkpoint files (names ending in "
                                    f"{', '.join(CHECKPOINT_SUFFIXES)})")
                out += _in_epoch_order(hits, say, f"--ckpt {item}")
            else:
                if not Path(item).is_file():
                    raise UserError(f"--ckpt {item}: no such file or folder (or 'random')")
                out.append(CheckpointFile(item, epoch_of(Path(item).name)))
    if not out:
        raise UserError("--ckpt names no checkpoint")
    seen, unique = set(), []
    for c in out:
        ident = c.path if c.random else str(Path(c.path).resolve())
        if ident not in seen:
            seen.add(ident)
            unique.append(c)
    return unique


def parse_seeds(text: str, default: int) -> list:
    """--seeds 0,1,2 -> [0, 1, 2]; without it, [--seed]."""
    if text is None:
        return [default]
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text}: give distinct integers, e.g. 0,1,2")
    return seeds


# Frozen-feature tasks share the feature cache and take minutes; each training task takes hours on its own.
FROZEN_TASK_PREFIXES = ("knn_", "linear_in1k", "linear_in100", "linear_stl10", "voc07_svm", "align_uniform")


def task_groups(task_names) -> list:
    """The task groups of one job each (--launcher slurm): the frozen-feature tasks together, every training
    task (SGD probes, semi-supervised, detection) alone."""
    frozen = [n for n in task_names if n.startswith(FROZEN_TASK_PREFIXES)]
    return ([frozen] if frozen else []) + [[n] for n in task_names if n not in frozen]
