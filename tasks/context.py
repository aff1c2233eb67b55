"""What a task receives (the run's context) and what it returns (its output), so that the command above
builds the one record from it."""
import dataclasses
from pathlib import Path


@dataclasses.dataclass
class RunContext:
    model: object  # the frozen encoder: a ResNet whose forward returns pooled features
    checkpoint: object  # backbones.checkpoints.Checkpoint
    arch: str
    data_root: Path
    device: object  # torch.device: the one device of the run (core.distributed.resolve_device)
    seed: int
    demo: bool
    out_dir: Path
    resume: bool = False
    log: object = print
    rank: int = 0  # under torchrun: this process's rank and the process count
    world: int = 1
    device_asked: str = None  # --device as given (None: the default); `cuda` lets Detectron2 launch on every GPU

    def state_path(self, task_name, seed=None, suffix=".pt") -> Path:
        """Where a training task keeps its resumable state: one file (or folder) per task, checkpoint and seed."""
        ident = (self.checkpoint.sha256 or self.checkpoint.path.replace(":", "-"))[:16]
        seed = self.seed if seed is None else seed
        return self.out_dir / "state" / f"{task_name}__{ident}__seed{seed}{'__demo' if self.demo else ''}{suffix}"


@dataclasses.dataclass
class TaskOutput:
    """metrics: {name: value} (names of results/paper/paper_tables.csv); info: what the record's `data` section
    holds (split sizes, choices made, cache hits, history); engine: what trained it; artifacts: files written
    beside the record ({name: text, bytes, or a function writing a path}); probe: the protocol values a paper
    table's cell depends on."""

    metrics: dict
    info: dict = dataclasses.field(default_factory=dict)
    engine: str = "pytorch"
    artifacts: dict = dataclasses.field(default_factory=dict)
    probe: dict = dataclasses.field(default_factory=dict)


NOTHING = TaskOutput({})  # what processes other than rank 0 return under torchrun
