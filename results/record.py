"""The record schema, in one place: what a result record holds, how it is written (atomically, one JSON file
per checkpoint, task and run) and read back (validated, older versions named), and the summary CSV.

Version history:
- 1: records of the first releases (no `record_version` field).
- 2: `record_version` written; `probe` holds the protocol values that the paper tables' cells depend on
  (probe protocol, epochs, engine, resolution, method definition).
- 3: `checkpoint` names the encoder family (`family`: resnet | vit), its releasing project (`release`) and the
  load report (`load`: tensors loaded / expected, unused file keys by group) and, for a checkpoint of a run
  folder, its `epoch`; `probe.tap` names the feature tap; `precision` the autocast dtype; `trials` keeps each
  seed's metrics ({seed, metrics}) with `metrics` their mean and `metrics_std` their standard deviation when
  several seeds ran; `run_key` the fields that make two records the same run (`run_key()`).
"""
import csv
import io
import json
import platform
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path

from core.cli import UserError
from core.files import REPO_ROOT, atomic_save, atomic_write_bytes, atomic_write_json, atomic_write_text, \
    remove_leftovers

RECORD_VERSION = 3
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
    if path.stem in ("backbone", "last") or checkpoint.get("epoch") is not None:  # a run folder's file
        return f"{path.parent.name}-{path.stem}"
    return path.stem.split(".")[0]


def checkpoint_section(described: dict, epoch=None) -> dict:
    """The record's `checkpoint` section from `Checkpoint.describe()`: the v3 fields (`family`, `release`,
    `load`) filled in for Checkpoint objects that predate them (ResNets, no load report), and the run folder's
    `epoch` when the file's name gives one."""
    out = {"family": "resnet", "release": None, "load": None, **described}
    if epoch is not None:
        out["epoch"] = epoch
    return out


def trial_summary(trials: list) -> tuple:
    """(mean metrics, std metrics or None) over trials [{seed, metrics}]: the metrics every trial has; the
    standard deviation is the sample one (n - 1), as the tables print it, and only when several trials ran."""
    names = [m for m in trials[0]["metrics"] if all(m in t["metrics"] for t in trials)]
    mean = {m: statistics.fmean(float(t["metrics"][m]) for t in trials) for m in names}
    if len(trials) < 2:
        return {m: trials[0]["metrics"][m] for m in names}, None
    return mean, {m: statistics.stdev(float(t["metrics"][m]) for t in trials) for m in names}


def build_record(*, task, demo, trials, data, protocol, checkpoint, arch, device, engine, command,
                 started, probe=None, precision="float32", run_key=None) -> dict:
    """A record of version RECORD_VERSION. `trials` is [{seed, metrics}] (one per --seeds value); `protocol`
    is {key: {value, source}}; `checkpoint` is `checkpoint_section(...)` (path, sha256, format, family,
    release, load report, input normalisation, notes, pretraining, epoch); `probe` holds the protocol values
    that a paper table's cell depends on (probe protocol, tap, epochs, engine, ...)."""
    metrics, std = trial_summary(trials)
    record = {
        "record_version": RECORD_VERSION,
        "task": task,
        "demo": demo,
        "engine": engine,
        "metrics": metrics,
        "trials": trials,
        "probe": probe or {},
        "precision": precision,
        "data": data,
        "protocol": protocol,
        "checkpoint": checkpoint,
        "arch": arch,
        "seed": trials[0]["seed"],
        "seeds": [t["seed"] for t in trials],
        "device": device,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "command": command,
        "wall_time_s": round(time.time() - started, 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if std is not None:
        record["metrics_std"] = std
    record["run_key"] = run_key or derive_run_key(record)
    return record


# ---- which records are the same run -------------------------------------------------------------------

def make_run_key(*, checkpoint_id, task, protocol_values, seeds, demo, selection=None) -> dict:
    """What makes two records the same run: the checkpoint's content (sha256; the random encoder's id), the
    task, every protocol value, the seeds, --demo, and how the network was taken from the file (`selection`:
    --arch, --ckpt-key, --ckpt-format, checkpoint --set values; only those given)."""
    return {"checkpoint": checkpoint_id, "task": task, "protocol": protocol_values, "seeds": list(seeds),
            "demo": bool(demo), "selection": {k: v for k, v in (selection or {}).items() if v not in (None, {})}}


def protocol_values(protocol: dict) -> dict:
    """{key: value} of a record's {key: {value, source}} protocol section."""
    return {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in (protocol or {}).items()}


def derive_run_key(record: dict) -> dict:
    """The run key of a record that does not carry one (versions 1 and 2)."""
    ck = record.get("checkpoint") or {}
    return make_run_key(checkpoint_id=ck.get("sha256") or ck.get("path"), task=record.get("task"),
                        protocol_values=protocol_values(record.get("protocol")),
                        seeds=record.get("seeds") or [record.get("seed", 0)], demo=record.get("demo", False))


def run_key_text(key: dict) -> str:
    """A run key as one comparable string (JSON with sorted keys; lists and tuples alike)."""
    return json.dumps(key, sort_keys=True, default=str)


def finished_runs(out_dir: Path) -> dict:
    """{run key text: record path} of every readable record under `out_dir/records`."""
    return {run_key_text(r.get("run_key") or derive_run_key(r)): path
            for path, r in read_records(out_dir, warn=lambda *a: None)}


def write_record(out_dir: Path, record: dict, artifacts=None) -> Path:
    """The record, atomically; `artifacts` ({name: text, bytes, or a function writing a path}) are written
    beside it as `<record stem>.<name>` first, and the record lists them."""
    validate(record, "the record being written")
    remove_leftovers(Path(out_dir) / "records")
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


SUMMARY_COLUMNS = ["record", "task", "checkpoint", "sha256", "format", "family", "release", "epoch", "arch", "tap",
                   "probe", "engine", "precision", "demo", "seeds", "n", "finished"]


def summary_csv(out_dir: Path, records=None) -> str:
    """One row per record: what was measured (checkpoint, family, epoch, tap, probe, seeds) and one column per
    metric (the mean over the record's trials), then `<metric>_std` columns for records of several trials."""
    records = read_records(out_dir) if records is None else records
    metrics = sorted({m for _, r in records for m in r.get("metrics", {})})
    stds = sorted({m for _, r in records for m in r.get("metrics_std") or {}})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS + metrics + [f"{m}_std" for m in stds])
    for path, r in records:
        ck, probe = r.get("checkpoint", {}), r.get("probe") or {}
        seeds = r.get("seeds") or [r.get("seed")]
        writer.writerow([Path(path).relative_to(out_dir).as_posix(), r.get("task"), ck.get("path"),
                         ck.get("sha256"), ck.get("format"), ck.get("family", "resnet"), ck.get("release"),
                         ck.get("epoch"), r.get("arch"), probe.get("tap"), probe.get("probe"), r.get("engine"),
                         r.get("precision"), r.get("demo"), " ".join(str(x) for x in seeds), len(seeds),
                         r.get("finished")]
                        + [_fmt(r.get("metrics", {}).get(m)) for m in metrics]
                        + [_fmt((r.get("metrics_std") or {}).get(m)) for m in stds])
    return buf.getvalue()


def write_summary(out_dir: Path) -> Path:
    """`summary.csv` (`summary_csv`), deterministic for the same records."""
    path = Path(out_dir) / "summary.csv"
    atomic_write_text(path, summary_csv(out_dir))
    return path


def _fmt(value):
    return "" if value is None else f"{value:.2f}" if isinstance(value, float) else value
