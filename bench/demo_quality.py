#!/usr/bin/env python
"""Demo-scale quality checks of pretraining, measured in one run (numbers go to README.md).

    python bench/demo_quality.py [--out runs/demo_quality]

1. MSBReg (`demo` config) against a random encoder on every demo kNN / linear task.
2. Table 13 at demo scale: BYOL with LayerNorm heads (`demo_byol_ln`) against MSBReg with LayerNorm
   heads and λ_b > 0 (`demo_k4_ln`): final embedding std (collapse ≈ 0) and demo kNN / linear.
Each pretraining takes ~4 minutes on 2 CPU cores.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = "knn_in1k,knn_in100,knn_stl10,linear_in1k,linear_in100,linear_stl10"


def evaluate(ckpt, out, extra=()):
    subprocess.run([sys.executable, str(HERE.parent / "evaluate/run.py"), "--ckpt", ckpt, "--task", TASKS, "--demo",
                    "--out", str(out), *extra], check=True, stdout=subprocess.DEVNULL)
    metrics = {}
    for path in sorted((out / "records").rglob("*.json")):
        rec = json.loads(path.read_text())
        metrics.update({k: v for k, v in rec["metrics"].items() if k.endswith("_top1")})
    return metrics


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo_quality"))
    args = p.parse_args(argv)
    results, stds = {}, {}
    results["random"] = evaluate("random", args.out / "eval-random", ["--arch", "resnet18"])
    for config in ("demo", "demo_byol_ln", "demo_k4_ln"):
        run = args.out / config
        subprocess.run([sys.executable, str(HERE.parent / "pretrain/train.py"), "--config", config, f"out_dir={run}"], check=True)
        last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
        stds[config] = (last["embedding_std"], last["effective_rank"])
        results[config] = evaluate(str(run / "backbone.pth"), args.out / f"eval-{config}")
    names = list(results)
    metrics = sorted(results["random"])
    print("| metric | " + " | ".join(names) + " | demo - random |")
    print("| --- " * (len(names) + 2) + "|")
    for m in metrics:
        vals = [results[n].get(m, float("nan")) for n in names]
        print(f"| {m} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {results['demo'][m] - results['random'][m]:+.1f} |")
    print("\n| config | final embedding std (1/sqrt(d) = 0.088 when spread) | effective rank |")
    print("| --- | --- | --- |")
    for config, (std, rank) in stds.items():
        print(f"| {config} | {std:.4f} | {rank:.1f} |")


if __name__ == "__main__":
    main()
