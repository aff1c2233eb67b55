"""Frozen-feature tasks under torchrun: each process extracts its shard, rank 0 joins them in dataset order,
classifies and writes the one record; the features and metrics are the one-process ones, bit for bit.

Why exact: every process runs one CPU thread (OMP_NUM_THREADS=1, as this test suite runs) and the batch size (10)
divides every shard (demo splits of 300/100 STL-10 and 60/60 VOC images, halves of 150/50/30), so each image goes
through the same kernels in the same batch composition as in one process."""
import json
import os
import subprocess
import sys

import numpy as np
import torch

from core.files import REPO_ROOT
from evaluate.run import cli


def records(out):
    return {r["task"]: (p, r) for p, r in ((p, json.loads(p.read_text())) for p in (out / "records").rglob("*.json")
                                           if "." not in p.stem)}


def shared_cache(tmp_path, demo_root, name):
    """A cache folder of its own (no feature hits from other tests) beside the session's demo data."""
    cache = tmp_path / name
    cache.mkdir()
    (cache / demo_root.parent.name).symlink_to(demo_root.parent)
    return cache


def torchrun(args, out, cache):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SSL_SUITE_CACHE": str(cache)}
    # --standalone: a free rendezvous port per job, so that jobs on one node never collide
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(REPO_ROOT / "evaluate" / "run.py"), *args, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(job, timeout=300):
    stdout, stderr = job.communicate(timeout=timeout)
    assert job.returncode == 0, stderr[-3000:]
    return stdout


def test_two_processes_give_the_one_process_metrics_and_features(tmp_path, demo_root):
    # 32 px images (VOC's res5 map is then 1 x 1, pooled by 1): the sharding, not the image size, is tested
    args = ["--ckpt", "random", "--arch", "resnet18", "--task", "knn_stl10,linear_stl10,voc07_svm", "--demo",
            "--no-report", "--set", "save_features=true", "--set", "batch_size=10", "--set", "resize=36",
            "--set", "crop=32", "--set", "square=32", "--set", "pool_kernel=1"]
    assert cli(args + ["--out", str(tmp_path / "one")]) == 0
    cache = shared_cache(tmp_path, demo_root, "cache-two")
    stdout = finish(torchrun(args, tmp_path / "two", cache))
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert set(two) == {"knn_stl10", "linear_stl10", "voc07_svm"} and stdout.count("record:") == 3
    for task, (path, rec) in two.items():
        assert rec["data"]["processes"] == 2
        assert rec["metrics"] == one[task][1]["metrics"], task
        a = np.load(path.with_name(path.stem + ".features.npz"))
        b = np.load(one[task][0].with_name(one[task][0].stem + ".features.npz"))
        for key in ("train_x", "train_y", "test_x", "test_y"):  # the same rows in the same (dataset) order
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{task} {key}")
    # the shards went through the cache folder and are gone; the joined features are cached for any process count
    assert not list((cache / "features").glob("*.part*"))


def test_two_concurrent_torchrun_jobs_share_one_cache_folder(tmp_path, demo_root, monkeypatch):
    """Two `torchrun --nproc_per_node 2` evaluations at once on one cache folder holding one whole entry and one
    truncated one (a job killed while writing it): both read the whole one; both find the truncated one broken,
    and the four processes race to extract and write it again (the cold case, for that entry); every record has
    the one-process metrics, and the folder ends with whole entries and no temporaries."""
    args = ["--ckpt", "random", "--arch", "resnet18", "--task", "knn_stl10", "--demo", "--set", "resize=36",
            "--set", "crop=32", "--set", "batch_size=10"]
    cache = shared_cache(tmp_path, demo_root, "cache")
    monkeypatch.setenv("SSL_SUITE_CACHE", str(cache))  # the one-process run writes its entries there
    assert cli(args + ["--out", str(tmp_path / "one")]) == 0
    expected = records(tmp_path / "one")["knn_stl10"][1]["metrics"]
    entries = lambda: sorted((cache / "features").glob("*.pt"))  # noqa: E731
    assert len(entries()) == 2
    truncated = max(entries(), key=lambda f: f.stat().st_size)  # the train split's
    truncated.write_bytes(truncated.read_bytes()[:2000])
    jobs = [torchrun(args, tmp_path / "two" / str(j), cache) for j in range(2)]
    outputs = [finish(job) for job in jobs]
    for j, stdout in enumerate(outputs):
        rec = records(tmp_path / "two" / str(j))["knn_stl10"][1]
        assert rec["metrics"] == expected, j
        assert rec["data"]["feature_cache"]["test"] == "hit", rec["data"]["feature_cache"]
    assert len(entries()) == 2 and not list((cache / "features").glob("*.part*"))
    for f in entries():  # whole entries, whoever wrote them last
        assert set(torch.load(f, weights_only=True)) == {"features", "labels", "index", "skipped"}
    healed = [line for stdout in outputs for line in stdout.splitlines() if "unreadable" in line]
    # at least the first job to look found the truncated file broken, removed it and extracted it again
    assert healed and all("removed" in line and truncated.name in line for line in healed), healed
