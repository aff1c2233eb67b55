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
import pytest
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


# 32 px images (VOC's res5 map is then 1 x 1, pooled by 1): the sharding, not the image size, is tested
SMALL = ["--set", "resize=36", "--set", "crop=32", "--set", "batch_size=10"]
THREE_TASKS = ["--ckpt", "random", "--arch", "resnet18", "--task", "knn_stl10,linear_stl10,voc07_svm", "--demo",
               "--no-report", "--set", "save_features=true", *SMALL, "--set", "square=32", "--set", "pool_kernel=1"]
KNN = ["--ckpt", "random", "--arch", "resnet18", "--task", "knn_stl10", "--demo", "--no-report", *SMALL]


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory, demo_root):
    """The three tasks in one process, writing their cache entries into a cache folder of their own; then, on
    that folder, two `torchrun --nproc_per_node 2` jobs at once: job A the three tasks, job B kNN alone (the same
    STL-10 features). Before they start, VOC's entries are removed (job A extracts them in shards) and the STL-10
    train entry is truncated, as by a job killed while writing it (both jobs find it broken, and their four
    processes race to extract and write it again); the STL-10 test entry stays whole (both read it)."""
    tmp = tmp_path_factory.mktemp("torchrun_frozen")
    cache = shared_cache(tmp, demo_root, "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSL_SUITE_CACHE", str(cache))
        assert cli(THREE_TASKS + ["--out", str(tmp / "one")]) == 0
    rows = {f: len(torch.load(f, weights_only=True)["labels"]) for f in (cache / "features").glob("*.pt")}
    assert sorted(rows.values()) == [60, 60, 100, 300]  # VOC trainval and test, STL-10 test and train
    for f, n in rows.items():
        if n == 60:
            f.unlink()
    truncated = next(f for f, n in rows.items() if n == 300)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    jobs = {"A": torchrun(THREE_TASKS, tmp / "A", cache), "B": torchrun(KNN, tmp / "B", cache)}
    stdout = {name: finish(job) for name, job in jobs.items()}
    return {"one": records(tmp / "one"), "A": records(tmp / "A"), "B": records(tmp / "B"), "stdout": stdout,
            "cache": cache, "truncated": truncated}


def test_two_processes_give_the_one_process_metrics_and_features(two_jobs):
    one, two = two_jobs["one"], two_jobs["A"]
    assert set(two) == {"knn_stl10", "linear_stl10", "voc07_svm"} and two_jobs["stdout"]["A"].count("record:") == 3
    # VOC's splits were extracted in shards (STL-10's train split too, by whichever job healed it first)
    assert two["voc07_svm"][1]["data"]["feature_cache"] == {"train": "miss", "test": "miss"}
    for task, (path, rec) in two.items():
        assert rec["data"]["processes"] == 2
        assert rec["metrics"] == one[task][1]["metrics"], task
        a = np.load(path.with_name(path.stem + ".features.npz"))
        b = np.load(one[task][0].with_name(one[task][0].stem + ".features.npz"))
        for key in ("train_x", "train_y", "test_x", "test_y"):  # the same rows in the same (dataset) order
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{task} {key}")
    # the shards went through the cache folder and are gone; the joined features are cached for any process count
    assert not list((two_jobs["cache"] / "features").glob("*.part*"))


def test_two_concurrent_torchrun_jobs_share_one_cache_folder(two_jobs):
    """Both jobs have the one-process kNN metrics; both read the whole entry; both found the truncated one broken
    (at least the first to look did), removed it and extracted it again; the folder ends with whole entries of
    every split and no temporaries."""
    expected = two_jobs["one"]["knn_stl10"][1]["metrics"]
    for job in ("A", "B"):
        rec = two_jobs[job]["knn_stl10"][1]
        assert rec["metrics"] == expected, job
        assert rec["data"]["feature_cache"]["test"] == "hit", (job, rec["data"]["feature_cache"])
    entries = sorted((two_jobs["cache"] / "features").glob("*.pt"))
    assert len(entries) == 4 and not list((two_jobs["cache"] / "features").glob("*.part*"))
    for f in entries:  # whole entries, whoever wrote them last
        assert set(torch.load(f, weights_only=True)) == {"features", "labels", "index", "skipped"}
    healed = [line for out in two_jobs["stdout"].values() for line in out.splitlines() if "unreadable" in line]
    assert healed and all("removed" in line and two_jobs["truncated"].name in line for line in healed), healed
