#!/usr/bin/env python
"""Demo-scale quality of every pretraining method, measured in one run (the table goes to README.md).

    python bench/demo_quality.py [--out runs/demo_quality] [--configs demo,demo_simclr] [--reuse]

Pretrains each `demo_<method>` config (a few minutes each on 2 CPU cores), evaluates its exported backbone
and a random ResNet-18 on the demo kNN and linear tasks, and prints one table: top-1 of the 20-NN and linear
tasks, the mean of all the kNN top-1s (every k) minus the random encoder's, and the final embedding std and
effective rank from the run's log.
`--reuse` skips the pretraining of a config whose run folder already holds a backbone.pth.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
TASKS = "knn_in1k,knn_in100,knn_stl10,linear_in1k,linear_in100,linear_stl10"
CONFIGS = ("demo", "demo_byol", "demo_byol_lb", "demo_byol_ls", "demo_byol_uniformity", "demo_byol_multicrop",
           "demo_simclr", "demo_simclrv2", "demo_mocov2", "demo_barlowtwins", "demo_wmse", "demo_drlim", "demo_cpc",
           "demo_byol_ln", "demo_k4_ln")


def evaluate(ckpt, out, extra=()):
    subprocess.run([sys.executable, str(HERE.parent / "evaluate/run.py"), "--ckpt", ckpt, "--task", TASKS, "--demo",
                    "--out", str(out), *extra], check=True, stdout=subprocess.DEVNULL)


def top1(ev) -> dict:
    metrics = {}
    for path in sorted((ev / "records").rglob("*.json")):
        metrics.update({k: v for k, v in json.loads(path.read_text())["metrics"].items() if k.endswith("_top1")})
    return metrics


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo_quality"))
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated config names")
    p.add_argument("--reuse", action="store_true", help="keep existing pretraining runs and evaluations")
    args = p.parse_args(argv)
    random_eval = args.out / "eval-random"
    if not (args.reuse and (random_eval / "records").is_dir()):
        evaluate("random", random_eval, ["--arch", "resnet18"])
    rows = {"random ResNet-18": (top1(random_eval), None)}
    for config in args.configs.split(","):
        run, ev = args.out / config, args.out / f"eval-{config}"
        if not (args.reuse and (run / "backbone.pth").is_file()):
            subprocess.run([sys.executable, str(HERE.parent / "pretrain/train.py"), "--config", config,
                            f"out_dir={run}"], check=True)
        if not (args.reuse and (ev / "records").is_dir()):
            evaluate(str(run / "backbone.pth"), ev)
        last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
        method = yaml.safe_load((run / "config.yaml").read_text())["method"]
        rows[f"`{config}` ({method})"] = top1(ev), (last["embedding_std"], last["effective_rank"])
    measured = sorted(rows["random ResNet-18"][0], key=lambda m: ("linear" in m, m))
    knn = [m for m in measured if "knn" in m]
    shown = [m for m in measured if "knn" not in m or "_knn20_" in m]  # 20-NN and linear: 10 columns in all
    base = statistics.fmean(rows["random ResNet-18"][0][m] for m in knn)
    print("| run | " + " | ".join(m.replace("_top1", "") for m in shown)
          + " | kNN mean − random | embedding std | effective rank |")
    print("| --- " * (len(shown) + 4) + "|")
    for name, (metrics, monitors) in rows.items():
        mean = statistics.fmean(metrics[m] for m in knn)
        mon = f"{monitors[0]:.3f} | {monitors[1]:.1f}" if monitors else " | "
        print(f"| {name} | " + " | ".join(f"{metrics.get(m, float('nan')):.1f}" for m in shown)
              + f" | {mean - base:+.1f} | {mon} |", flush=True)


if __name__ == "__main__":
    main()
