"""The record schema, in one place: what a result record holds, how it is written (atomically, one JSON file
per checkpoint, task and run) and read back (validated, older versions named), and the summary CSV.

Version history:
- 1: records of the first releases (no `record_version` field).
- 2: `record_version` written; `probe` holds the protocol values that the paper tables' cells depend on
  (probe protocol, epochs, engine, resolution, method definition).
"""
import csv
import io
import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

from core.cli import UserError
from core.files import REPO_ROOT, atomic_save, atomic_write_bytes, atomic_write_json, atomic_write_text

RECORD_VERSION = 2
REQUIRED = ("task", "metrics", "checkpoint")  # every version has these
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
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in checkpoint_name)
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


def build_record(*, task, demo, metrics, data, protocol, checkpoint, arch, seed, device, engine, command,
                 started, probe=None) -> dict:
    """A record of version RECORD_VERSION. `protocol` is {key: {value, source}}; `checkpoint` describes the
    file (path, sha256, format, part, dropped, input normalisation, notes, pretraining); `probe` holds the
    protocol values that a paper table's cell depends on (probe protocol, epochs, engine, ...)."""
    return {
        "record_version": RECORD_VERSION,
        "task": task,
        "demo": demo,
        "engine": engine,
        "metrics": metrics,
        "probe": probe or {},
        "data": data,
        "protocol": protocol,
        "checkpoint": checkpoint,
        "arch": arch,
        "seed": seed,
        "device": device,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "command": command,
        "wall_time_s": round(time.time() - started, 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_record(out_dir: Path, record: dict, artifacts=None) -> Path:
    """The record, atomically; `artifacts` ({name: text, bytes, or a function writing a path}) are written
    beside it as `<record stem>.<name>` first, and the record lists them."""
    validate(record, "the record being written")
    path = record_path(Path(out_dir), record["task"], checkpoint_name(record["checkpoint"]), record["demo"])
    record = dict(record)
    if artifacts:
        record["artifacts"] = {}
        for name, content in artifacts.items():
            target = path.with_name(f"{path.stem}.{name}")
            if callable(content):
                atomic_save(target, content)
            elif isinstance(content, bytes):
                atomic_write_bytes(target, content)
            else:
                atomic_write_text(target, content)
            record["artifacts"][name] = target.name
    atomic_write_json(path, record)
    return path


def validate(record, where: str) -> int:
    """The record's version; a record without the fields every version has is an error naming `where`."""
    if not isinstance(record, dict):
        raise UserError(f"{where} is not a result record (a JSON object)")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise UserError(f"{where} is not a result record: it lacks {', '.join(missing)}")
    version = record.get("record_version", 1)
    if not isinstance(version, int) or version > RECORD_VERSION:
        raise UserError(f"{where} is a record of version {version}, newer than this suite's {RECORD_VERSION}; "
                        "update the suite to read it")
    return version


def read_record(path) -> dict:
    """One record, validated; records of version 1, which lack `record_version`, get it filled in."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable record ({e.__class__.__name__})") from None
    version = validate(record, str(path))
    return {**record, "record_version": version}


def is_record_file(path: Path) -> bool:
    """Records are `<checkpoint>__<time>[__demo][-n].json`; their artifacts carry a further suffix."""
    return path.suffix == ".json" and "." not in path.stem


def read_records(out_dir: Path, warn=print) -> list:
    """Every record under `out_dir/records`, as (path, record), in path order; a JSON file there that is not
    a readable record is named and skipped."""
    out = []
    for path in sorted((Path(out_dir) / "records").rglob("*.json")):
        if not is_record_file(path):
            continue
        try:
            out.append((path, read_record(path)))
        except UserError as e:
            warn(f"skipped: {e}")
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
