#!/usr/bin/env python
"""Expand a sweep file (configs x a grid of overrides, plus fixed `set:` overrides) into pretraining commands;
print them or run them.

    python pretrain/sweep.py pretrain/sweeps/table11.yaml [--run] [extra key=value ...]
"""
import argparse
import itertools
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def commands(sweep: dict, extra=()):
    keys = list(sweep["grid"])
    fixed = [f"{k}={v}" for k, v in (sweep.get("set") or {}).items()]
    for config in sweep["configs"]:
        for values in itertools.product(*(sweep["grid"][k] for k in keys)):
            setting = dict(zip(keys, values))
            out = sweep["out_dir"].format(config=config, **setting)
            yield [sys.executable, str(HERE / "train.py"), "--config", config, *fixed,
                   *(f"{k}={v}" for k, v in setting.items()), f"out_dir={out}", *extra]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", type=Path)
    p.add_argument("--run", action="store_true", help="run the commands one after the other")
    p.add_argument("extra", nargs="*", metavar="key=value", help="overrides added to every run")
    args = p.parse_args(argv)
    if not args.sweep.is_file():
        print(f"error: no sweep file {args.sweep}", file=sys.stderr)
        return 2
    for cmd in commands(yaml.safe_load(args.sweep.read_text()), args.extra):
        print(shlex.join(cmd), flush=True)
        if args.run and subprocess.run(cmd).returncode != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
