"""Frozen-feature tasks under torchrun: each process extracts its shard, rank 0 joins them in dataset order,
classifies and writes the one record; the metric is the one-process metric."""
import json
import os
import subprocess
import sys

import numpy as np

from core.files import REPO_ROOT
from evaluate.run import cli


def records(out):
    return {r["task"]: (p, r) for p, r in ((p, json.loads(p.read_text())) for p in (out / "records").rglob("*.json")
                                           if "." not in p.stem)}


def test_two_processes_give_the_one_process_metrics_and_features(tmp_path, demo_root):
    args = ["--ckpt", "random", "--arch", "resnet18", "--task", "knn_stl10,linear_stl10,voc07_svm", "--demo",
            "--set", "save_features=true"]
    assert cli(args + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SSL_SUITE_CACHE": str(tmp_path / "cache-two")}  # no cache hits
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29523", str(REPO_ROOT / "evaluate" / "run.py"), *args, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert set(two) == {"knn_stl10", "linear_stl10", "voc07_svm"} and done.stdout.count("record:") == 3
    for task, (path, rec) in two.items():
        assert rec["data"]["processes"] == 2
        assert rec["metrics"] == one[task][1]["metrics"], task
        a = np.load(path.with_name(path.stem + ".features.npz"))
        b = np.load(one[task][0].with_name(one[task][0].stem + ".features.npz"))
        for key in ("train_x", "train_y", "test_x", "test_y"):  # the same rows in the same (dataset) order
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
    # the shards went through the cache folder and are gone; the joined features are cached for any process count
    assert not list((tmp_path / "cache-two" / "features").glob("*.part*"))
