"""Experiment tracking for those who use it: each record's metrics and protocol logged to Weights & Biases.

One W&B run per record (checkpoint x task x protocol x seeds), created when the task starts and finished
when its record is written. Its id is kept in `<out>/state/wandb/<run key hash>.id`, written before the
run starts, so a job that is preempted and requeued (or rerun with --resume) continues the same W&B run
(`wandb.init(id=..., resume="allow")`). wandb is an optional dependency: without it `--wandb` is a
one-sentence error. `WANDB_MODE=offline` logs into `<out>/state/wandb/wandb/offline-run-*` for a later
`wandb sync`.
"""
import hashlib
import secrets
import string
from pathlib import Path

from core.cli import UserError
from core.files import atomic_write_text
from results.record import run_key_text


class WandbTracker:
    def __init__(self, project: str, state_dir: Path):
        try:
            import wandb
        except ImportError:
            raise UserError("--wandb needs the wandb package (pip install wandb)") from None
        self.wandb, self.project, self.state_dir = wandb, project, Path(state_dir)

    def id_file(self, run_key: dict) -> Path:
        digest = hashlib.sha256(run_key_text(run_key).encode()).hexdigest()[:20]
        return self.state_dir / f"{digest}.id"

    def run_id(self, run_key: dict) -> str:
        """The W&B run id of this run key: the kept one, or a new one, kept before the run starts."""
        path = self.id_file(run_key)
        if path.is_file():
            return path.read_text().strip()
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id form
        atomic_write_text(path, run_id + "\n")
        return run_id

    def start(self, run_key: dict, name: str, config: dict):
        """Open (or reopen, after a requeue) the W&B run of `run_key`."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return self.wandb.init(project=self.project, id=self.run_id(run_key), resume="allow", name=name,
                               config=config, dir=str(self.state_dir))

    @staticmethod
    def config(task: str, protocol: dict, checkpoint: dict, seeds, demo: bool) -> dict:
        return {"task": task, "protocol": {k: v.get("value") for k, v in protocol.items()},
                "checkpoint": {k: checkpoint.get(k) for k in ("path", "sha256", "format", "family", "release",
                                                              "epoch")},
                "seeds": list(seeds), "demo": demo}

    def finish(self, run, record: dict, path: Path) -> str:
        """Log the record's metrics (their mean, std and each trial's) as one step and close the run; its id."""
        values = dict(record["metrics"])
        values.update({f"{m}_std": v for m, v in (record.get("metrics_std") or {}).items()})
        for trial in record.get("trials") or []:
            values.update({f"seed{trial['seed']}/{m}": v for m, v in trial["metrics"].items()})
        epoch = record["checkpoint"].get("epoch")
        run.config.update({"probe": record.get("probe"), "record": str(path)}, allow_val_change=True)
        run.log({**values, **({"epoch": epoch} if epoch is not None else {})})
        run_id = run.id
        run.finish()
        return run_id
