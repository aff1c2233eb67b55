"""The feature cache heals: a truncated, empty or foreign `.cache/features/*.pt` is reported in one warning line,
removed and extracted again, and the record is the cold run's."""
import datetime
import json
import queue
import time
from pathlib import Path

import pytest
import torch

from evaluate.run import cli

ARGS = ["--ckpt", "random", "--arch", "resnet18", "--task", "knn_stl10", "--demo",
        "--set", "resize=36", "--set", "crop=32"]


@pytest.fixture
def own_cache(tmp_path, monkeypatch, demo_root):
    """A feature cache of this test alone, beside the session's demo data."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / demo_root.parent.name).symlink_to(demo_root.parent)
    monkeypatch.setenv("SSL_SUITE_CACHE", str(cache))
    return cache / "features"


def run_record(out, capsys):
    assert cli(ARGS + ["--out", str(out)]) == 0
    text = capsys.readouterr().out
    return json.loads(next((out / "records").rglob("*.json")).read_text()), text


@pytest.mark.parametrize("how", ["truncated", "empty", "not a cache"])
def test_damaged_cache_file_is_reported_removed_and_extracted_again(tmp_path, capsys, own_cache, how):
    cold, _ = run_record(tmp_path / "cold", capsys)
    files = sorted(own_cache.glob("*.pt"))
    assert cold["data"]["feature_cache"] == {"train": "miss", "test": "miss"} and len(files) == 2
    good = {f: torch.load(f, weights_only=True) for f in files}
    for f in files:
        data = f.read_bytes()
        f.write_bytes({"truncated": data[: len(data) // 2], "empty": b""}.get(how, b"PK\x03\x04 something else"))
    healed, text = run_record(tmp_path / "healed", capsys)
    warnings = [line for line in text.splitlines() if "unreadable" in line]
    assert len(warnings) == 2 and all("warning" in w and "removed" in w for w in warnings), text
    assert "Traceback" not in text
    assert healed["metrics"] == cold["metrics"] and healed["data"] == cold["data"]
    for f, entry in good.items():  # written again, as the cold run wrote them
        again = torch.load(f, weights_only=True)
        assert set(again) == set(entry) and all(torch.equal(again[k], v) for k, v in entry.items() if k != "skipped")
    warm, text = run_record(tmp_path / "warm", capsys)
    assert warm["data"]["feature_cache"] == {"train": "hit", "test": "hit"} and "unreadable" not in text
    assert warm["metrics"] == cold["metrics"]


# ---- under torchrun: one rank decides ------------------------------------------------------------------------

def tiny_encoder():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten()).eval()


def stl10_test_split(demo_root):
    from datasets.stl10 import read_stl10

    return read_stl10(demo_root / "stl10" / "stl10_binary", "test")


def extract(split, rank=0, world=1, log=print):
    from backbones.features import extract_features
    from datasets.views import EvalTransform

    # batches of 10: the two shards of 50 images are batched as the one-process run batches them (bit-equal)
    return extract_features(tiny_encoder(), "tiny", "tiny", split, EvalTransform(36, 32, (0.5,) * 3, (0.25,) * 3),
                            batch_size=10, num_workers=0, rank=rank, world=world, log=log)


CASES = {"appears-for-rank-1": ("none", "good"), "disappears-for-rank-1": ("good", "none"),
         "damaged-for-rank-0": ("damaged", "good"), "damaged-for-rank-1": ("good", "damaged")}


def rank_process(rank, store, cases, demo_root, results):
    """One of two gloo processes, running every case in turn (one process start-up for all of them). Per case
    (cache folder, views): `views[rank]` is what this rank would find in the cache if it looked: 'none' (no
    file), 'good' (a good copy) or 'damaged' (a truncated copy)."""
    import os

    import torch.distributed as dist

    import backbones.features as features

    real, write = features.read_cache, features.atomic_torch_save

    def slow_entry_write(obj, path):  # rank 0 writes the joined entry late: the others must wait for it
        if ".part" not in Path(path).name:
            time.sleep(0.3)
        write(obj, path)

    features.atomic_torch_save = slow_entry_write
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    split = stl10_test_split(Path(demo_root))
    for case, (cache, views) in enumerate(cases):
        os.environ["SSL_SUITE_CACHE"] = str(cache)
        view = views[rank]
        features.read_cache = lambda path, log=print: None if view == "none" else real(Path(cache) / f"{view}.pt", log)
        lines = []
        x, y, info = extract(split, rank, 2, log=lines.append)
        # released only once the entry is whole on disk (a rank that goes on may read it at once)
        entry_ready = real(Path(cache) / "features" / f"{info['cache_key']}.pt", lines.append) is not None
        # numpy arrays travel by value (a tensor would be shared memory that dies with this process)
        results.put((case, rank, info["cache"], None if x is None else x.numpy(), None if y is None else y.numpy(),
                     lines + ([] if entry_ready else ["entry not ready"])))
        dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, demo_root):
    """Every case of CASES run by the same two gloo processes, each case in a cache folder of its own that holds
    the one-process entry ('good' and 'damaged' copies beside it; the entry itself only where rank 0 finds it)."""
    import shutil

    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("two_ranks")
    split = stl10_test_split(demo_root)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("SSL_SUITE_CACHE", str(root / "reference"))
        reference, labels, _ = extract(split)
    [entry] = (root / "reference" / "features").glob("*.pt")
    cases = []
    for name, views in CASES.items():
        cache = root / name
        (cache / "features").mkdir(parents=True)
        (cache / "good.pt").write_bytes(entry.read_bytes())
        (cache / "damaged.pt").write_bytes(entry.read_bytes()[:1000])
        if views[0] == "good":  # what rank 0 finds decides; the real entry is where a miss writes it
            shutil.copy(entry, cache / "features" / entry.name)
        cases.append((cache, views))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=rank_process, args=(r, root / "store", cases, demo_root, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    try:
        deadline = time.monotonic() + 150
        while len(got) < 2 * len(cases):
            try:
                case, rank, status, x, y, lines = results.get(timeout=1)
                got[list(CASES)[case], rank] = status, x, y, lines
            except queue.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not failed and time.monotonic() < deadline, f"a rank failed or hung (exit codes {failed})"
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return got, reference, labels, entry.name, root


@pytest.mark.parametrize("case", list(CASES))
def test_rank_0_decides_for_every_rank(monkeypatch, demo_root, two_ranks, case):
    """The cache file appears, disappears or breaks between the two ranks' looks: both take rank 0's branch, finish
    (no hang: a 30 s collective timeout) and rank 0's features are the one-process features."""
    got, reference, labels, entry, root = two_ranks
    views, cache = CASES[case], root / case
    expected = "hit" if views[0] == "good" else "miss"
    assert got[case, 0][0] == got[case, 1][0] == expected
    assert torch.equal(torch.from_numpy(got[case, 0][1]), reference)
    assert torch.equal(torch.from_numpy(got[case, 0][2]), labels)
    assert got[case, 1][1] is None
    assert sum("unreadable" in line for r in range(2) for line in got[case, r][3]) == (views[0] == "damaged")
    assert not any("entry not ready" in line for r in range(2) for line in got[case, r][3])
    assert [p.name for p in (cache / "features").iterdir()] == [entry]  # no shard left behind
    monkeypatch.setenv("SSL_SUITE_CACHE", str(cache))
    again, _, info = extract(stl10_test_split(demo_root))
    assert info["cache"] == "hit" and torch.equal(again, reference)


def test_cache_key_holds_the_precision_and_every_setting_that_changes_features(tmp_path, monkeypatch, demo_root):
    """An fp16/bf16 run never reuses float32 features (issue 23.7); bf16 autocast runs on the CPU too."""
    from backbones.features import extract_features, feature_cache_key
    from datasets.views import EvalTransform

    monkeypatch.setenv("SSL_SUITE_CACHE", str(tmp_path / "cache"))
    split = stl10_test_split(demo_root)
    t = EvalTransform(36, 32, (0.5,) * 3, (0.25,) * 3)
    base = feature_cache_key("ckpt", "arch", "fp", t, "pool", "float32")
    others = [feature_cache_key("ckpt", "arch", "fp", t, "pool", "bfloat16"),
              feature_cache_key("ckpt", "arch", "fp", t, "cls_last4", "float32"),
              feature_cache_key("ckpt", "arch", "fp", EvalTransform(36, 32, (0.5,) * 3, (0.2,) * 3), "pool", "float32"),
              feature_cache_key("ckpt", "arch", "fp", EvalTransform(40, 32, (0.5,) * 3, (0.25,) * 3), "pool",
                                "float32"),
              feature_cache_key("ckpt", "arch", "fp", EvalTransform(36, 32, (0.5,) * 3, (0.25,) * 3, "bicubic"),
                                "pool", "float32")]
    assert len({base, *others}) == 6
    f32, _, i32 = extract(split)
    run = dict(batch_size=10, num_workers=0)
    bf16, _, ibf = extract_features(tiny_encoder(), "tiny", "tiny", split, t, precision="bfloat16", **run)
    kept, _, ikept = extract_features(tiny_encoder(), "tiny", "tiny", split, t, precision="bfloat16",
                                      as_float32=False, **run)
    assert (i32["cache"], ibf["cache"], ikept["cache"]) == ("miss", "miss", "hit")
    assert (i32["precision"], ibf["precision"]) == ("float32", "bfloat16") and i32["cache_key"] != ibf["cache_key"]
    assert bf16.dtype == torch.float32 and kept.dtype == torch.bfloat16 and torch.equal(kept.float(), bf16)
    assert not torch.equal(bf16, f32)  # computed in bfloat16, not a float32 entry read back
    torch.testing.assert_close(bf16, f32, rtol=2 ** -6, atol=2 ** -6)  # a few bfloat16 roundings (8-bit mantissa)
