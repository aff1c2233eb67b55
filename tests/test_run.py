"""evaluate/run.py end to end on demo data: records, caching, and one-sentence errors with exit code 2."""
import json
import subprocess
import sys
from pathlib import Path

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
    code, out, err = run(capsys, "--ckpt", "random", "--arch", "resnet18", "--task", tasks, "--demo",
                         "--out", str(tmp_path))
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


def test_saved_torchvision_checkpoint(capsys, tmp_path, r18_ckpt, demo_root):
    code, out, err = run(capsys, "--ckpt", str(r18_ckpt), "--task", "knn_in1k,linear_stl10", "--demo",
                         "--out", str(tmp_path), "--set", "k=1,3", "--set", "l2_grid=0.001")
    assert code == 0, err
    recs = [json.loads(p.read_text()) for p in records_under(tmp_path)]
    knn = next(r for r in recs if r["task"] == "knn_in1k")
    assert knn["checkpoint"]["sha256"] and knn["checkpoint"]["format"] == "torchvision"
    assert set(knn["metrics"]) == {"in1k_knn1_top1", "in1k_knn1_top5", "in1k_knn3_top1", "in1k_knn3_top5"}
    assert knn["protocol"]["k"]["value"] == [1, 3] and "overridden" in knn["protocol"]["k"]["source"]
    lin = next(r for r in recs if r["task"] == "linear_stl10")
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
])
def test_user_errors_exit_2_with_one_sentence(capsys, tmp_path, args, message, demo_root):
    code, out, err = run(capsys, *args, "--out", str(tmp_path))
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
                             "--out", str(tmp_path / "out"))
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
                         "--set", "crop=64", "--set", "k=5")
    assert code == 2 and str(victim) in err and not records_under(tmp_path / "out")
    code, out, err = run(capsys, "--ckpt", "random", "--arch", "resnet18", "--task", "knn_in1k", "--data-root",
                         str(root), "--out", str(tmp_path / "out"), "--set", "num_classes=12", "--set", "resize=64",
                         "--set", "crop=64", "--set", "k=5", "--set", "skip_bad_images=true")
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
    proc = subprocess.run([sys.executable, str(REPO / "evaluate" / "run.py"), "--ckpt", "random", "--task",
                           "nope", "--demo"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown task")
