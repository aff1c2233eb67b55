"""evaluate/run.py end to end on demo data: records, caching, and one-sentence errors with exit code 2."""
import errno
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from evaluate.run import cli

REPO = Path(__file__).resolve().parents[1]


def records_under(out):
    return sorted((Path(out) / "records").rglob("*.json"))


def one_sentence(err, message):
    """stderr ends with one 'error:' line holding `message` (progress bars may precede it), no traceback."""
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip()]
    return lines[-1].startswith("error: ") and message in lines[-1] and "Traceback" not in err


# 32 px inputs for the tests about what a run does (records, folders, seeds), not about the numbers it measures
SMALL_IMAGES = ("--set", "resize=36", "--set", "crop=32")


def run(capsys, *args):
    code = cli(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def r18_ckpt(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ckpt") / "r18_tv.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_random_encoder_knn_and_linear(capsys, tmp_path, demo_root):
    tasks = "knn_in1k,knn_in100,knn_stl10,linear_in1k,linear_in100,linear_stl10,align_uniform"
    code, out, err = run(capsys, "--ckpt", "random", "--arch", "resnet18", "--task", tasks, "--demo", *SMALL_IMAGES,
                         "--set", "decode_size=36", "--set", "crop_size=32", "--out", str(tmp_path))
    assert code == 0, err
    recs = {json.loads(p.read_text())["task"]: json.loads(p.read_text()) for p in records_under(tmp_path)}
    assert set(recs) == set(tasks.split(","))
    assert set(recs["align_uniform"]["metrics"]) == {"alignment", "uniformity"}
    assert 0 <= recs["align_uniform"]["metrics"]["alignment"] <= 4 and recs["align_uniform"]["metrics"]["uniformity"] <= 0
    assert (tmp_path / "tables" / "table1.md").is_file() and (tmp_path / "tables" / "linear.csv").is_file()
    knn = recs["knn_stl10"]
    assert set(knn["metrics"]) == {f"stl10_knn{k}_top{t}" for k in (5, 20, 200) for t in (1, 5)}
    assert all(0 <= v <= 100 for v in knn["metrics"].values())
    assert knn["demo"] is True and knn["arch"] == "resnet18" and knn["checkpoint"]["format"] == "random"
    assert knn["data"]["train_size"] == 300 and knn["data"]["test_size"] == 100
    assert knn["protocol"]["temperature"] == {"value": 0.07, "source": knn["protocol"]["temperature"]["source"]}
    assert "§8.3" in knn["protocol"]["k"]["source"]
    for key in ("git_commit", "packages", "device", "wall_time_s", "seed"):
        assert key in knn
    lin = recs["linear_in100"]
    assert lin["data"]["train_size"] == 180 and "overridden" in lin["protocol"]["num_classes"]["source"]
    summary = (tmp_path / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 7 and "stl10_knn5_top1" in summary[0]


def torchvision_features(ckpt, images, resize, crop, mean, std):
    """Pooled features of torchvision's own ResNet-18 (its forward with fc removed) on images prepared with PIL
    by hand (short side to `resize`, bicubic; centre `crop`; scaled to [0, 1]; normalised): no suite code."""
    from PIL import Image

    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    model.fc = torch.nn.Identity()
    batch = []
    for pixels in images:
        img = Image.fromarray(pixels).resize((resize, resize), Image.BICUBIC)  # square images: short side = both
        top = (resize - crop) // 2
        img = img.crop((top, top, top + crop, top + crop))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        batch.append((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
    with torch.no_grad():
        return model.eval()(torch.stack(batch)).numpy()


def brute_force_knn_top1(train_x, train_y, test_x, test_y, k, temperature, classes):
    """NPID's weighted vote, one query at a time: cosine similarity to every training feature, the k most
    similar vote exp(sim / T) for their class, the class with the most weight wins."""
    train_n = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    correct = 0
    for q, label in zip(test_x, test_y):
        sims = train_n @ (q / np.linalg.norm(q))
        votes = np.zeros(classes)
        for i in np.argsort(-sims, kind="stable")[:k]:
            votes[train_y[i]] += math.exp(sims[i] / temperature)
        correct += int(np.argmax(votes) == label)
    return 100.0 * correct / len(test_y)


def test_knn_equals_torchvision_features_and_a_brute_force_vote(capsys, tmp_path, r18_ckpt, demo_root):
    """kNN of a saved torchvision ResNet-18 against an independent computation: torchvision's own forward on
    images prepared by hand, then NPID's vote in a loop."""
    from datasets.stl10 import read_stl10

    code, out, err = run(capsys, "--ckpt", str(r18_ckpt), "--task", "knn_stl10,linear_stl10", "--demo",
                         "--out", str(tmp_path), "--set", "k=1,3", "--set", "l2_grid=0.001",
                         "--set", "save_features=true", "--no-report")
    assert code == 0, err
    assert not (tmp_path / "tables").exists()  # --no-report
    paths = {json.loads(p.read_text())["task"]: p for p in records_under(tmp_path)}
    knn = json.loads(paths["knn_stl10"].read_text())
    assert knn["checkpoint"]["sha256"] and knn["checkpoint"]["format"] == "torchvision"
    assert set(knn["metrics"]) == {"stl10_knn1_top1", "stl10_knn1_top5", "stl10_knn3_top1", "stl10_knn3_top5"}
    assert knn["protocol"]["k"]["value"] == [1, 3] and "overridden" in knn["protocol"]["k"]["source"]
    saved = np.load(paths["knn_stl10"].with_name(paths["knn_stl10"].stem + ".features.npz"))
    root = demo_root / "stl10" / "stl10_binary"
    prot = {k: v["value"] for k, v in knn["protocol"].items()}
    assert (prot["resize"], prot["crop"], prot["interpolation"]) == (70, 64, "bicubic")
    train, test = read_stl10(root, "train"), read_stl10(root, "test")
    ours_train = torchvision_features(r18_ckpt, train.array, 70, 64, prot["mean"], prot["std"])
    ours_test = torchvision_features(r18_ckpt, test.array, 70, 64, prot["mean"], prot["std"])
    np.testing.assert_allclose(saved["train_x"], ours_train, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(saved["test_x"], ours_test, rtol=1e-4, atol=1e-4)
    for k in (1, 3):
        expected = brute_force_knn_top1(ours_train, train.labels, ours_test, test.labels, k, 0.07, 10)
        # the task averages hits in float32; one image more or less right moves top-1 by a whole point
        assert knn["metrics"][f"stl10_knn{k}_top1"] == pytest.approx(expected, abs=1e-4)
    lin = json.loads(paths["linear_stl10"].read_text())
    assert lin["data"]["chosen_l2"] == 0.001


def test_features_are_cached(capsys, tmp_path, r18_ckpt, demo_root):
    from backbones.checkpoints import make_encoder
    from backbones.features import EvalTransform, extract_features
    from datasets.stl10 import read_stl10

    model, info, arch = make_encoder(str(r18_ckpt))
    split = read_stl10(demo_root / "stl10" / "stl10_binary", "test")
    t = EvalTransform(70, 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    f1, y1, i1 = extract_features(model, info.cache_id, arch, split, t, num_workers=0)
    f2, y2, i2 = extract_features(model, info.cache_id, arch, split, t, num_workers=0)
    assert (i1["cache"], i2["cache"]) == ("miss", "hit")
    assert torch.equal(f1, f2) and torch.equal(y1, y2) and f1.shape == (100, 512)
    _, _, i3 = extract_features(model, info.cache_id, arch, split, EvalTransform(70, 56, (0.5,) * 3, (0.25,) * 3),
                                num_workers=0)
    assert i3["cache"] == "miss"  # another transform is another cache entry


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "random", "--task", "knn_in1k", "--data-root", "/nonexistent/data"], "is not a directory"),
    (["--ckpt", "random", "--task", "knn_in1k"], "give --data-root"),
    (["--ckpt", "random", "--task", "knn_everything", "--demo"], "unknown task 'knn_everything'"),
    (["--ckpt", "random", "--task", "voc_det", "--demo", "--set", "engine=mmdet"], "engine must be auto"),
    (["--ckpt", "random", "--task", "knn_stl10", "--demo", "--set", "kk=3"], "unknown --set key 'kk'; valid keys"),
    (["--ckpt", "random", "--task", "knn_stl10", "--demo", "--set", "k=five"], "--set k=five: expected int"),
    (["--ckpt", "random", "--task", "knn_stl10", "--demo", "--set", "k=500"], "exceeds the 300 training images"),
    (["--ckpt", "random", "--task", "knn_stl10", "--demo", "--device", "cuda"], "no CUDA device"),
    (["--task", "knn_stl10", "--demo"], "--ckpt"),
    (["--ckpt", "random", "--ckpt-part", "target", "--task", "knn_stl10", "--demo"], "--ckpt random has no file"),
    (["--ckpt", "/nonexistent/r50.pth", "--task", "knn_stl10", "--demo"], "no such file or folder"),
    (["--ckpt", "random", "--task", "knn_stl10", "--demo", "--seeds", "0,x"], "expected comma-separated integers"),
    (["--ckpt", "random", "--task", "knn_stl10", "--demo", "--seeds", "1,1"], "give distinct integers"),
    (["--ckpt", "random", "--task", "knn_stl10", "--demo", "--launcher", "slurm", "--time", "soon"],
     "--time soon: expected minutes"),
])
def test_user_errors_exit_2_with_one_sentence(capsys, tmp_path, args, message, demo_root):
    code, out, err = run(capsys, *args, "--out", str(tmp_path), "--no-report")
    assert code == 2
    assert one_sentence(err, message)
    assert not records_under(tmp_path)


def test_bad_checkpoints_exit_2(capsys, tmp_path, r18_ckpt, demo_root):
    truncated = tmp_path / "trunc.pth"
    truncated.write_bytes(r18_ckpt.read_bytes()[:5000])
    for ckpt, arch, message in [(truncated, None, "not a readable checkpoint"),
                                (r18_ckpt, "resnet50", "does not fit resnet50")]:
        extra = ["--arch", arch] if arch else []
        code, out, err = run(capsys, "--ckpt", str(ckpt), *extra, "--task", "knn_stl10", "--demo",
                             "--out", str(tmp_path / "out"), "--no-report")
        assert code == 2 and one_sentence(err, message)
        assert not records_under(tmp_path / "out")


def test_unreadable_image_stops_the_run(capsys, tmp_path, demo_root):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(demo_root / "imagenet", root / "imagenet")
    victim = sorted((root / "imagenet" / "val").rglob("*.JPEG"))[3]
    victim.write_bytes(b"not a jpeg")
    code, out, err = run(capsys, "--ckpt", "random", "--arch", "resnet18", "--task", "knn_in1k", "--data-root",
                         str(root), "--out", str(tmp_path / "out"), "--set", "num_classes=12", "--set", "resize=64",
                         "--set", "crop=64", "--set", "k=5", "--no-report")
    assert code == 2 and str(victim) in err and not records_under(tmp_path / "out")
    code, out, err = run(capsys, "--ckpt", "random", "--arch", "resnet18", "--task", "knn_in1k", "--data-root",
                         str(root), "--out", str(tmp_path / "out"), "--set", "num_classes=12", "--set", "resize=64",
                         "--set", "crop=64", "--set", "k=5", "--set", "skip_bad_images=true", "--no-report")
    assert code == 0, err
    rec = json.loads(records_under(tmp_path / "out")[0].read_text())
    assert rec["data"]["test_skipped_images"] == 1 and rec["data"]["test_size"] == 119


def test_script_runs_from_another_directory(tmp_path, demo_root):
    """`python evaluate/run.py` works from any working directory, and --help lists every task."""
    proc = subprocess.run([sys.executable, str(REPO / "evaluate" / "run.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for name in ("linear_in1k", "semisup_10pct", "knn_stl10", "voc07_svm", "coco_instseg"):
        assert name in proc.stdout
    # config errors (exit 2, one sentence) are tested in-process: test_user_errors_exit_2_with_one_sentence


def save_r18(path, seed):
    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet18().state_dict(), path)


def test_a_run_folder_is_read_in_epoch_order_and_finished_runs_are_skipped(capsys, tmp_path, demo_root):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for epoch in (10, 2, 1):  # 10 sorts before 2 by name
        save_r18(run_dir / f"backbone_epoch{epoch:04d}.pth", epoch)
    os.link(run_dir / "backbone_epoch0010.pth", run_dir / "backbone.pth")  # the run's copies of its last epoch
    os.link(run_dir / "backbone_epoch0010.pth", run_dir / "last.pth")
    args = ["--ckpt", str(run_dir), "--task", "knn_stl10", "--demo", "--set", "k=5", "--out", str(tmp_path / "out"),
            "--no-report", *SMALL_IMAGES]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "skipping backbone.pth, last.pth: the folder holds epoch checkpoints (3, epochs 1-10)" in out
    assert [line.strip() for line in out.splitlines() if line.strip().startswith("epoch ")] == [
        "epoch 1 (from the file name)", "epoch 2 (from the file name)", "epoch 10 (from the file name)"]
    recs = [json.loads(p.read_text()) for p in records_under(tmp_path / "out")]
    assert sorted(r["checkpoint"]["epoch"] for r in recs) == [1, 2, 10]
    for r in recs:
        assert r["record_version"] == 3 and r["run_key"]["checkpoint"] == r["checkpoint"]["sha256"]
        assert r["checkpoint"]["family"] == "resnet" and r["precision"] == "float32"
        assert Path(r["checkpoint"]["path"]).name == f"backbone_epoch{r['checkpoint']['epoch']:04d}.pth"
    first = {p: p.read_bytes() for p in records_under(tmp_path / "out")}

    code, out, err = run(capsys, *args)  # the same command again: nothing new
    assert code == 0, err
    assert "nothing new: all 3 runs of this command have records" in out
    assert out.count("skipped, its record exists") == 3
    assert {p: p.read_bytes() for p in records_under(tmp_path / "out")} == first

    code, out, err = run(capsys, *args, "--set", "k=3")  # another protocol value is another run
    assert code == 0 and len(records_under(tmp_path / "out")) == 6
    code, out, err = run(capsys, *args, "--force")
    assert code == 0 and len(records_under(tmp_path / "out")) == 9


def test_checkpoint_names_of_other_projects_give_their_epochs(tmp_path):
    from core.cli import UserError
    from evaluate.plan import expand_checkpoints

    names = ["checkpoint_0099.pth.tar", "checkpoint0100.pth", "epoch=9-step=1000.ckpt", "model_phase10.torch",
             "backbone_epoch0003.pth", "checkpoint.pth", "notes.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    said = []
    got = expand_checkpoints([str(tmp_path)], said.append)
    assert [(Path(c.path).name, c.epoch) for c in got] == [
        ("backbone_epoch0003.pth", 3), ("epoch=9-step=1000.ckpt", 9), ("model_phase10.torch", 10),
        ("checkpoint_0099.pth.tar", 99), ("checkpoint0100.pth", 100)]
    assert len(said) == 1 and "skipping checkpoint.pth:" in said[0]
    # a glob, several files at once, a folder without epoch files (every checkpoint file, by name)
    assert [c.epoch for c in expand_checkpoints([str(tmp_path / "checkpoint*")], said.append)] == [99, 100]
    two = expand_checkpoints([f"{tmp_path / 'checkpoint0100.pth'},random", str(tmp_path / "model_phase10.torch")])
    assert [(c.path, c.epoch) for c in two] == [(str(tmp_path / "checkpoint0100.pth"), 100), ("random", None),
                                                (str(tmp_path / "model_phase10.torch"), 10)]
    plain = tmp_path / "zoo"
    plain.mkdir()
    for name in ("b.pth", "a.pth.tar", "readme.md"):
        (plain / name).write_bytes(b"")
    assert [Path(c.path).name for c in expand_checkpoints([str(plain)])] == ["a.pth.tar", "b.pth"]
    with pytest.raises(UserError, match="matches no checkpoint file"):
        expand_checkpoints([str(tmp_path / "*.nothing")])
    with pytest.raises(UserError, match="no such file or folder"):
        expand_checkpoints([str(tmp_path / "missing.pth")])


def test_seeds_keep_each_trial_and_their_mean_and_std(capsys, tmp_path, r18_ckpt, demo_root):
    base = ["--ckpt", str(r18_ckpt), "--task", "linear_stl10", "--demo", "--no-report", *SMALL_IMAGES]
    singles = {}
    for seed in (0, 1):  # independent runs, one seed each
        code, out, err = run(capsys, *base, "--seed", str(seed), "--out", str(tmp_path / f"seed{seed}"))
        assert code == 0, err
        singles[seed] = json.loads(records_under(tmp_path / f"seed{seed}")[0].read_text())["metrics"]
    code, out, err = run(capsys, *base, "--seeds", "0,1", "--out", str(tmp_path / "trials"))
    assert code == 0, err
    rec = json.loads(records_under(tmp_path / "trials")[0].read_text())
    assert [t["seed"] for t in rec["trials"]] == [0, 1] and rec["seeds"] == [0, 1]
    assert [t["metrics"] for t in rec["trials"]] == [singles[0], singles[1]]
    assert len({json.dumps(m, sort_keys=True) for m in singles.values()}) > 1  # the seed matters to this probe
    assert set(rec["metrics"]) == set(rec["metrics_std"]) == set(singles[0])
    for name in rec["metrics"]:
        values = [t["metrics"][name] for t in rec["trials"]]
        assert rec["metrics"][name] == pytest.approx(float(np.mean(values)), abs=1e-9)
        assert rec["metrics_std"][name] == pytest.approx(float(np.std(values, ddof=1)), abs=1e-9)
        assert f"{name} = {np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} (n=2)" in out
    assert any(v > 0 for v in rec["metrics_std"].values())


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch):
    from core.cli import UserError
    from core.files import atomic_torch_save, atomic_write_text

    target = tmp_path / "summary.csv"
    atomic_write_text(target, "the previous content\n")
    monkeypatch.setattr("core.files.os.fsync", enospc)  # the disk fills while the record's bytes are flushed
    with pytest.raises(UserError, match=r"^no space left on the device of .* while writing summary.csv; nothing "
                                        r"was replaced \(the previous file, if any, is intact\)"):
        atomic_write_text(target, "new content that does not fit\n")
    monkeypatch.undo()
    ckpt = tmp_path / "last.pth"
    atomic_torch_save({"step": 1}, ckpt)
    monkeypatch.setattr("torch.save", enospc)  # a checkpoint: torch.save itself meets the full disk
    with pytest.raises(UserError, match="while writing last.pth"):
        atomic_torch_save({"step": 2}, ckpt)
    assert target.read_text() == "the previous content\n" and torch.load(ckpt) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth", "summary.csv"]  # no temporary left


def test_a_full_disk_while_writing_a_record_exits_non_zero_with_one_sentence(capsys, tmp_path, monkeypatch,
                                                                            demo_root):
    monkeypatch.setattr("core.files.os.fsync", enospc)
    code, out, err = run(capsys, "--ckpt", "random", "--arch", "resnet18", "--task", "knn_stl10", "--demo",
                         "--set", "k=5", "--out", str(tmp_path), "--no-report")
    assert code == 2 and one_sentence(err, "no space left on the device of")
    assert not records_under(tmp_path) and not list(tmp_path.rglob("*.tmp"))


def test_half_written_records_are_never_read_and_old_ones_are_removed(tmp_path):
    from core.files import LEFTOVER_AGE_S, remove_leftovers
    from results.record import finished_runs, read_records

    folder = tmp_path / "records" / "knn_stl10"
    folder.mkdir(parents=True)
    old = folder / ".r18__20260101-000000.json.k3j2.tmp"  # a writer killed an hour ago
    old.write_text('{"task": "knn_stl10", "metrics": {}, "check')
    os.utime(old, (old.stat().st_atime - 3600, old.stat().st_mtime - 3600))
    young = folder / ".r18__20260101-000001.json.x9q1.tmp"  # a job writing into the same folder right now
    young.write_text('{"task": "knn_stl10", "metrics": {}, "checkpoint": {}}')
    assert read_records(tmp_path) == [] and finished_runs(tmp_path) == {}
    assert remove_leftovers(tmp_path / "records") == [old]
    assert not old.exists() and young.exists()
    assert remove_leftovers(tmp_path / "records", older_than_s=LEFTOVER_AGE_S) == []


def test_sanity_warns_when_the_checkpoint_is_no_better_than_a_random_encoder(capsys, tmp_path, demo_root):
    state = torchvision.models.resnet18().state_dict()
    empty = tmp_path / "zeros.pth"  # a file whose tensors were never trained nor even initialised
    torch.save({k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in state.items()}, empty)
    code, out, err = run(capsys, "--ckpt", str(empty), "--task", "knn_stl10", "--demo", "--set", "k=5", "--sanity",
                         "--out", str(tmp_path / "out"), "--no-report")
    assert code == 0, err
    line = next(l for l in out.splitlines() if l.startswith("sanity ("))
    ours, random_ = (float(x) for x in re.findall(r"checkpoint ([\d.]+), random resnet18 ([\d.]+)", line)[0])
    assert ours == pytest.approx(10.0) and random_ > ours  # constant features: every query votes one class
    assert f"WARNING: {empty} is no better than a random resnet18" in out
    assert out.index("WARNING") < out.index("[knn_stl10]")  # before the task


def test_wandb_logs_the_record_and_a_rerun_continues_the_same_wandb_run(capsys, tmp_path, monkeypatch, demo_root):
    pytest.importorskip("wandb")
    import dataclasses

    from tasks.registry import TASKS

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = ["--ckpt", "random", "--arch", "resnet18", "--task", "knn_stl10", "--demo", "--set", "k=5",
            "--out", str(tmp_path), "--no-report", "--wandb", "ssl-suite-test"]

    def preempted(ctx, p):
        raise KeyboardInterrupt  # the job is stopped in the middle of its task

    real = TASKS["knn_stl10"]
    monkeypatch.setitem(TASKS, "knn_stl10", dataclasses.replace(real, run=preempted))
    code, out, err = run(capsys, *args)
    assert code == 130 and not records_under(tmp_path), err
    [id_file] = (tmp_path / "state" / "wandb").glob("*.id")
    run_id = id_file.read_text().strip()
    monkeypatch.setitem(TASKS, "knn_stl10", real)
    code, out, err = run(capsys, *args, "--resume")  # the requeued job
    assert code == 0, err
    assert f"wandb: run {run_id} (ssl-suite-test)" in out
    assert list((tmp_path / "state" / "wandb").glob("*.id")) == [id_file]
    runs = sorted((tmp_path / "state" / "wandb" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # both attempts wrote into the W&B run of this id (wandb sync merges them)
    assert logged_history(runs[0]) == {}  # the preempted attempt logged nothing
    logged = logged_history(runs[1])
    record = json.loads(records_under(tmp_path)[0].read_text())
    assert logged["stl10_knn5_top1"] == record["metrics"]["stl10_knn5_top1"]
    assert logged["seed0/stl10_knn5_top1"] == record["trials"][0]["metrics"]["stl10_knn5_top1"]


def wandb_records(path):
    """The protobuf records of a W&B run log (`run-<id>.wandb`): LevelDB's log format as wandb writes it (a
    7-byte file header ':W&B', 0xBEE1, version 0; 32 KiB blocks of chunks: crc32 u32, length u16, type u8 with
    1 full, 2 first, 3 middle, 4 last; a block tail shorter than a chunk header is padding)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, header = Path(path).read_bytes(), 32768, 7
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
    pos, pending, out = 7, b"", []
    while pos + header <= len(data):
        if block - pos % block < header:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + header:pos + header + length], pos + header + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def logged_history(offline_run):
    """{key: value} of the history rows of an offline W&B run."""
    [path] = offline_run.glob("run-*.wandb")
    out = {}
    for rec in wandb_records(path):
        if rec.WhichOneof("record_type") == "history":
            out.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
    return {k: v for k, v in out.items() if not k.startswith("_")}
