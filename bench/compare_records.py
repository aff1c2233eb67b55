#!/usr/bin/env python
"""The metrics of two records folders side by side, and whether they agree within a stated tolerance.

    python bench/compare_records.py RESULTS_A RESULTS_B --tol 0          # must be equal
    python bench/compare_records.py cpu/ cuda/ --tol 1.0                  # within 1 point

Records are matched by (task, seed, the protocol values a record was measured with); each metric of a
matched pair is printed with its difference. Exit status 1 when a difference exceeds --tol or a record has
no partner, 0 otherwise. bench/gpu_smoke.sh uses it to compare CPU and GPU runs, and one-process and
torchrun runs.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results.record import read_records  # noqa: E402

RUNTIME = {"query_chunk", "workers", "test_batch", "batch_size_extract"}  # settings that do not change results


def key(record):
    protocol = {k: v.get("value") if isinstance(v, dict) else v for k, v in record.get("protocol", {}).items()
                if k not in RUNTIME}
    return record["task"], record.get("seed"), json.dumps(protocol, sort_keys=True)


def compare(a_dir, b_dir, tol, say=print) -> int:
    a = {key(r): r for _, r in read_records(Path(a_dir))}
    b = {key(r): r for _, r in read_records(Path(b_dir))}
    bad = 0
    for k in sorted(set(a) | set(b)):
        task = k[0]
        if k not in a or k not in b:
            say(f"{task}: only in {a_dir if k in a else b_dir}")
            bad += 1
            continue
        for name in sorted(set(a[k]["metrics"]) | set(b[k]["metrics"])):
            va, vb = a[k]["metrics"].get(name), b[k]["metrics"].get(name)
            if va is None or vb is None:
                say(f"{task} {name}: {va} vs {vb} (missing)")
                bad += 1
                continue
            diff = vb - va
            over = abs(diff) > tol
            bad += over
            say(f"{task} {name}: {va:.4f} vs {vb:.4f} (diff {diff:+.4f}){'  > tolerance' if over else ''}")
    say(f"{len(set(a) & set(b))} matched records, {bad} problem(s), tolerance {tol}")
    return 1 if bad else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--tol", type=float, default=0.0, help="largest allowed |difference| of a metric")
    args = p.parse_args(argv)
    return compare(args.a, args.b, args.tol)


if __name__ == "__main__":
    sys.exit(main())
