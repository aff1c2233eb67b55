"""The one result writer: a JSON record per (checkpoint, task, run), and the summary CSV over them."""
import csv
import io
import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

from evaluate.common import REPO_ROOT, atomic_write_json, atomic_write_text

RECORD_VERSION = 1
PACKAGES = ("torch", "torchvision", "timm", "numpy", "scikit-learn", "faiss-cpu", "faiss-gpu", "pycocotools",
            "detectron2")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def record_path(out_dir: Path, task: str, checkpoint_name: str, demo: bool) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in checkpoint_name)
    base = out_dir / "records" / task / f"{safe}__{stamp}{'__demo' if demo else ''}"
    path, n = base.with_suffix(".json"), 1
    while path.exists():
        path, n = Path(f"{base}-{n}.json"), n + 1
    return path


def checkpoint_name(checkpoint: dict) -> str:
    """A file-name part for a checkpoint: its stem, with the run folder for pretrain/ outputs."""
    if checkpoint["format"] == "random":
        return checkpoint["path"].replace(":", "-")
    path = Path(checkpoint["path"])
    return f"{path.parent.name}-{path.stem}" if path.stem in ("backbone", "last") else path.stem.split(".")[0]


def write_record(out_dir: Path, record: dict, artifacts=None) -> Path:
    """The record, atomically; `artifacts` ({name: text}) are written beside it as `<record stem>.<name>`
    first, and the record lists them."""
    path = record_path(Path(out_dir), record["task"], checkpoint_name(record["checkpoint"]), record["demo"])
    record = dict(record)
    if artifacts:
        record["artifacts"] = {}
        for name, text in artifacts.items():
            target = path.with_name(f"{path.stem}.{name}")
            atomic_write_text(target, text)
            record["artifacts"][name] = target.name
    atomic_write_json(path, record)
    return path


def read_records(out_dir: Path) -> list:
    """Every record under `out_dir/records`, as (path, record), in path order."""
    out = []
    for path in sorted((Path(out_dir) / "records").rglob("*.json")):
        try:
            record = json.loads(path.read_text())
        except ValueError:
            continue  # not ours: a record is only ever written whole
        if isinstance(record, dict) and "task" in record:  # records' artifacts (COCO results) sit beside them
            out.append((path, record))
    return out


def write_summary(out_dir: Path) -> Path:
    """`summary.csv`: one row per record, one column per metric (deterministic for the same records)."""
    records = read_records(out_dir)
    metrics = sorted({m for _, r in records for m in r.get("metrics", {})})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["record", "task", "checkpoint", "sha256", "format", "arch", "engine", "demo", "seed",
                     "finished"] + metrics)
    for path, r in records:
        ck = r.get("checkpoint", {})
        writer.writerow([path.relative_to(out_dir).as_posix(), r.get("task"), ck.get("path"), ck.get("sha256"),
                         ck.get("format"), r.get("arch"), r.get("engine"), r.get("demo"), r.get("seed"),
                         r.get("finished")] + [_fmt(r.get("metrics", {}).get(m)) for m in metrics])
    path = Path(out_dir) / "summary.csv"
    atomic_write_text(path, buf.getvalue())
    return path


def _fmt(value):
    return "" if value is None else f"{value:.2f}" if isinstance(value, float) else value
