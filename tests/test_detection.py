"""Detection: VOC AP against hand-computed cases, COCO metrics through pycocotools, data cleaning, the
torchvision engine end to end on the demo data, and the Detectron2 engine when it imports."""
import importlib.util
import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch

from evaluate.run import cli
from tasks.detection.data import _clean
from tasks.detection.metrics import ap_11_point, coco_metrics, coco_results, encode_masks, voc_class_ap

HAS_D2 = importlib.util.find_spec("detectron2") is not None
# Test scale: ResNet-18, the demo images at 64 px, 10-20 proposals per image, 16 RoIs of 4 x 4 (small box heads,
# small checkpoints).
SMALL = ["--set", "train_sizes=64", "--set", "test_size=64", "--set", "max_size=128", "--set", "rpn_post_nms_topk_train=20",
         "--set", "rpn_post_nms_topk_test=10", "--set", "roi_batch_size_per_image=16", "--set", "precise_bn_iters=1",
         "--set", "warmup_iters=1", "--set", "steps=2", "--set", "pooler_resolution=4"]
TINY = ["--set", "max_iter=2"]
ONE = ["--set", "max_iter=1"]
THREE = ["--set", "max_iter=3", "--set", "checkpoint_period=1"]


def test_voc_ap_hand_computed():
    gt = {"a": (np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([False, False])),
          "b": (np.array([[0, 0, 10, 10]], float), np.array([True]))}
    # both objects found, the best-scored detection a duplicate: precision 1/2 at recall 0.5, 2/3 at recall 1
    dets = [("a", 0.9, [0, 0, 10, 10]), ("a", 0.8, [0, 0, 10, 10]), ("a", 0.7, [20, 20, 30, 30])]
    assert voc_class_ap(dets, gt, 0.5) == pytest.approx(np.mean([1.0] * 6 + [2 / 3] * 5))
    # a detection of the difficult object counts neither way
    assert voc_class_ap([("b", 0.95, [0, 0, 10, 10])] + dets[::2], gt, 0.5) == pytest.approx(1.0)
    # IoU 0.5 exactly is not a match (Detectron2's `> thresh`); [0,0,10,20] vs [0,0,10,10] has IoU 0.5
    assert voc_class_ap([("a", 0.9, [0, 0, 10, 20])], {"a": gt["a"]}, 0.5) == 0.0
    assert np.isnan(voc_class_ap(dets, {"b": gt["b"]}, 0.5))
    assert ap_11_point(np.array([0.5, 1.0]), np.array([1.0, 0.5])) == pytest.approx((6 * 1.0 + 5 * 0.5) / 11)


def test_box_cleaning_clips_and_drops():
    counts = Counter()
    assert _clean((-5, 2, 50, 200), 100, 100, counts) == [0, 2, 50, 100]
    assert _clean((10, 10, 10, 30), 100, 100, counts) is None
    assert _clean((120, 10, 150, 30), 100, 100, counts) is None  # wholly outside: nothing left
    assert counts == {"boxes_clipped": 2, "degenerate_boxes_dropped": 2}


def test_coco_metrics_of_the_ground_truth_itself(demo_root):
    from pycocotools import mask as mask_utils

    from datasets.coco import annotation_mask, read_coco

    coco = read_coco(demo_root / "coco", "val")
    index = {c["id"]: i for i, c in enumerate(coco.categories)}
    preds = {}
    for im in coco.images:
        anns = [a for a in coco.annotations[im["id"]] if not a["iscrowd"]]
        masks = np.stack([annotation_mask(a, im["height"], im["width"]) for a in anns])
        preds[im["id"]] = {"boxes": np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]),
                           "scores": np.ones(len(anns)), "labels": np.array([index[a["category_id"]] for a in anns]),
                           "masks": encode_masks(masks)}
    results = coco_results(preds, [c["id"] for c in coco.categories])
    assert mask_utils.decode(results[0]["segmentation"]).sum() > 0
    metrics = coco_metrics(results, coco.annotation_file)
    assert metrics["ap_box"] == pytest.approx(100.0) and metrics["ap_mask50"] == pytest.approx(100.0)


def _record(out):
    return json.loads(next(p for p in (out / "records").rglob("*.json") if ".coco_results" not in p.name).read_text())


def _trained_weights(out, pattern="voc_det__*.pt"):
    return torch.load(next((out / "state").glob(pattern)), weights_only=True)


def _voc(out, *extra):
    return ["--ckpt", "random", "--arch", "resnet18", "--task", "voc_det", "--demo", "--out", str(out),
            "--set", "engine=torchvision", *SMALL, *extra]


def _assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0 or not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k], b[k], rtol=0, atol=atol), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_root):
    """voc_det on the torchvision engine, 3 iterations with a checkpoint after each, never interrupted."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert cli(_voc(out, *THREE)) == 0
    return _record(out), _trained_weights(out)


def test_torchvision_engine_voc_record(uninterrupted):
    rec, state = uninterrupted
    assert rec["engine"] == "torchvision" and rec["data"]["trials"][0]["seed"] == 0 and state["iteration"] == 3
    assert set(rec["metrics"]) == {"voc_det_ap50", "voc_det_ap75", "voc_det_ap"}
    assert len(rec["data"]["trials"][0]["ap50_by_class"]) == 20


def test_torchvision_engine_coco_record(tmp_path, capsys, monkeypatch, demo_root):
    from tasks.detection import tv_engine

    # every detection kept (Detectron2's threshold 0.05 keeps none of a network this untrained), so that
    # predicted masks go through the RLE encoding, the results file and pycocotools' mask AP
    monkeypatch.setitem(tv_engine.HEADS, "box_score_thresh", 0.0)
    monkeypatch.setitem(tv_engine.HEADS, "box_detections_per_img", 5)
    code = cli(["--ckpt", "random", "--arch", "resnet18", "--task", "coco_instseg", "--demo", "--out", str(tmp_path),
                "--set", "engine=torchvision", *SMALL, *TINY])
    assert code == 0, capsys.readouterr().err
    rec = _record(tmp_path)
    assert rec["engine"] == "torchvision"
    assert {"coco_ap_box", "coco_ap_box50", "coco_ap_mask", "coco_ap_mask75"} <= set(rec["metrics"])
    saved = json.loads((tmp_path / "records" / "coco_instseg" / rec["artifacts"]["coco_results_seed0.json"])
                       .read_text())
    assert len(saved) == 20 * 5 and {"segmentation", "bbox", "score"} <= set(saved[0])


def test_resume_after_an_interruption_at_iteration_1_of_3_equals_the_uninterrupted_run(
        tmp_path, monkeypatch, capsys, uninterrupted):
    from core.resume import StateFile

    save = StateFile.save

    def save_then_interrupt(self, state):
        save(self, state)
        raise KeyboardInterrupt  # as Ctrl-C right after the first checkpoint

    monkeypatch.setattr(StateFile, "save", save_then_interrupt)
    assert cli(_voc(tmp_path, *THREE)) == 130
    monkeypatch.undo()
    assert _trained_weights(tmp_path)["iteration"] == 1 and not (tmp_path / "records").exists()
    assert cli(_voc(tmp_path, *THREE, "--resume")) == 0
    assert "at iteration 1" in capsys.readouterr().out
    rec, state = uninterrupted
    _assert_same_weights(_trained_weights(tmp_path)["model"], state["model"])  # bit-equal on the CPU
    assert _record(tmp_path)["metrics"] == rec["metrics"]


def test_kill_9_during_training_then_resume_equals_the_uninterrupted_run(tmp_path, capsys, uninterrupted):
    """The run is killed (SIGKILL: no handler, no cleanup) as soon as a checkpoint exists; the same command
    with --resume then gives the uninterrupted run's weights and metrics, bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from core.files import REPO_ROOT

    # the killed run uses this process's thread count, as the resumed and uninterrupted runs here do (sums over
    # another count of threads round apart)
    job = subprocess.Popen([sys.executable, str(REPO_ROOT / "evaluate" / "run.py"), *_voc(tmp_path, *THREE)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    try:
        while not list((tmp_path / "state").glob("voc_det__*.pt")):
            assert job.poll() is None, "the run ended before its first checkpoint"
            time.sleep(0.01)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    assert job.returncode == -signal.SIGKILL and not (tmp_path / "records").exists()
    assert cli(_voc(tmp_path, *THREE, "--resume")) == 0
    assert "resumed voc_det__" in capsys.readouterr().out  # continued, not started over
    rec, state = uninterrupted
    _assert_same_weights(_trained_weights(tmp_path)["model"], state["model"])
    assert _record(tmp_path)["metrics"] == rec["metrics"]


def test_torchvision_engine_under_torchrun_equals_one_process(tmp_path, two_processes):
    """2 processes over Gloo (each trains on its half of every batch, BN over the global batch, precise BN on
    every process, rank 0 scores) against one process on the same global batches.

    Tolerance: weights within 1e-5 (measured: 2.4e-7) and metrics within 1e-3 AP points (measured: equal),
    float rounding only: the processes sum BN statistics and gradients in another order than one process
    does over the whole batch. One training step (run in the two_processes fixture's torchrun): after it those
    rounding differences change which of a random RPN's near-equal proposals top-k and NMS keep, and the runs
    drift apart by more than any float tolerance (the same holds for Detectron2 on GPUs). The images have one
    size (the demo's 160 x 120 at one training scale): with several scales each process pads its images to its
    own largest, and the padding enters the BN statistics."""
    _, two_out, stdout = two_processes
    assert cli(_voc(tmp_path / "one", *ONE)) == 0
    assert stdout.count("record:") == 1
    one, two = _record(tmp_path / "one"), _record(two_out)
    assert two["data"]["processes"] == 2 and one["data"]["processes"] == 1
    assert two["metrics"] == pytest.approx(one["metrics"], abs=1e-3)
    _assert_same_weights(_trained_weights(two_out)["model"], _trained_weights(tmp_path / "one")["model"], atol=1e-5)


# Run by torchrun in two Gloo processes: GlobalBatchNorm2d on this rank's half of a batch, and precise BN on
# this rank's share of the detection batches; each rank saves what it computed. Then, in the same processes (one
# torchrun start instead of two), evaluate/run.py's voc_det on the torchvision engine, one iteration.
TWO_PROCESS_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from core.distributed import setup_distributed
from tasks.detection import tv_engine
from tasks.detection.batchnorm import global_batchnorm
from tasks.detection.recipes import VOC_C4
from tests.test_detection import batchnorm_case, precise_bn_case

device, rank, world = setup_distributed(torch.device("cpu"))
bn, x, weights = batchnorm_case()
bn = global_batchnorm(bn, device)
part = x.chunk(world)[rank].clone().requires_grad_()
out = bn(part)
(out * weights.chunk(world)[rank]).sum().backward()
bn(part.detach() * 2 + 1)  # a second batch for the running statistics
grads = [t.grad.clone() for t in (bn.weight, bn.bias)]
for g in grads:
    dist.all_reduce(g)  # what DDP does with the parameters' gradients (a sum here, as over one batch)
model, records, p = precise_bn_case()
model = global_batchnorm(model, device)
tv_engine.precise_bn(model, records, p, VOC_C4, device, 0, rank, world)
torch.save({"out": out.detach(), "input_grad": part.grad, "param_grads": grads,
            "running": (bn.running_mean, bn.running_var),
            "precise": {k: v for k, v in model.state_dict().items() if "running" in k}}, sys.argv[1] + f"/rank{rank}.pt")
from evaluate.run import cli
from tests.test_detection import ONE, _voc
sys.exit(cli(_voc(sys.argv[1] + "/eval", *ONE)))
"""


def batchnorm_case():
    g = torch.Generator().manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(3, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(3, generator=g))
    return bn, torch.randn(4, 3, 5, 6, generator=g) * 3 + 1, torch.randn(4, 3, 5, 6, generator=g)


def precise_bn_case():
    from dataclasses import replace

    from datasets.catalog import ensure_demo
    from tasks.detection import tv_engine
    from tasks.detection.data import load_task_data
    from tasks.detection.recipes import VOC_C4

    p = replace(VOC_C4.protocol, **{**VOC_C4.demo, "train_sizes": (64,), "max_size": 128, "precise_bn_iters": 2,
                                    "rpn_post_nms_topk_train": 20, "roi_batch_size_per_image": 16})
    records = load_task_data(VOC_C4, p, ensure_demo())[0][:8]
    torch.manual_seed(0)
    import torchvision

    return tv_engine.build(VOC_C4, torchvision.models.resnet18(), 20, p), records, p


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, demo_root):
    import os
    import socket
    import subprocess
    import sys

    from core.files import REPO_ROOT

    out = tmp_path_factory.mktemp("two_processes")
    (out / "script.py").write_text(TWO_PROCESS_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(out / "script.py"), str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)], out / "eval", done.stdout


def test_global_batchnorm_on_two_processes_is_batchnorm_over_the_whole_batch(two_processes):
    """Against torch's BatchNorm2d on the concatenated batch: outputs, input and parameter gradients, running
    statistics (two batches, momentum 0.1, unbiased variance)."""
    bn, x, weights = batchnorm_case()
    x = x.clone().requires_grad_()
    out = bn(x)
    (out * weights).sum().backward()
    bn(x.detach() * 2 + 1)
    close = dict(rtol=0, atol=1e-5)
    ranks = two_processes[0]
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach(), **close)
    torch.testing.assert_close(torch.cat([r["input_grad"] for r in ranks]), x.grad, **close)
    for r in ranks:
        torch.testing.assert_close(r["param_grads"], [bn.weight.grad, bn.bias.grad], **close)
        torch.testing.assert_close(r["running"], (bn.running_mean, bn.running_var), **close)


def test_precise_bn_on_every_process_equals_one_process_over_the_whole_batches(two_processes):
    """Issue 23.1: every process runs precise BN on its share with BN over the global batch, and gets the
    statistics one process computes over the whole batches; those are (independently, by hooks here) the
    mean over the precise-BN batches of each batch's mean and unbiased variance at each BN layer."""
    from tasks.detection import tv_engine
    from tasks.detection.recipes import VOC_C4

    model, records, p = precise_bn_case()
    seen = {}

    def keep(name):
        def hook(module, args):
            x = args[0].detach().transpose(0, 1).flatten(1)
            seen.setdefault(name, []).append((x.mean(1), x.var(1, unbiased=True)))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_pre_hook(keep(name))
    tv_engine.precise_bn(model, records, p, VOC_C4, torch.device("cpu"), 0)
    one = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert len(seen) > 20 and all(len(v) == p.precise_bn_iters for v in seen.values())
    for name, stats in seen.items():
        torch.testing.assert_close(one[name + ".running_mean"], torch.stack([m for m, _ in stats]).mean(0))
        torch.testing.assert_close(one[name + ".running_var"], torch.stack([v for _, v in stats]).mean(0))
    for r in two_processes[0]:
        torch.testing.assert_close(r["precise"], one, rtol=1e-4, atol=1e-5)


def test_recipe_needs_a_resnet50(tmp_path, capsys, demo_root):
    code = cli(["--ckpt", "random", "--arch", "resnet18", "--task", "voc_det", "--data-root", str(demo_root),
                "--out", str(tmp_path)])
    assert code == 2 and "resnet50" in capsys.readouterr().err


def test_missing_annotation_file_is_named(tmp_path, capsys, demo_root):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(demo_root / "coco", root / "coco")
    (root / "coco" / "annotations" / "instances_val2017.json").unlink()
    code = cli(["--ckpt", "random", "--arch", "resnet18", "--task", "coco_instseg", "--data-root", str(root),
                "--out", str(tmp_path / "out"), "--set", "arch=any"])
    assert code == 2 and "instances_val2017.json" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_D2, reason="Detectron2 is not installed (README: Detection)")
def test_detectron2_loads_every_converted_weight(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from backbones.checkpoints import build_backbone
    from backbones.schemes import torchvision_to_detectron2_key
    from tasks.detection import d2_engine
    from tasks.detection.recipes import VOC_C4

    torch.manual_seed(0)
    encoder = build_backbone("resnet50")
    weights = d2_engine.detectron2_weights(encoder, tmp_path / "w.pkl")
    cfg = d2_engine.make_config(VOC_C4, VOC_C4.protocol, "resnet50", "cpu", 0, tmp_path, weights, "a", "b", 20, 1)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(weights))
    state = model.state_dict()
    for key, value in encoder.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        name = torchvision_to_detectron2_key(key)
        target = f"roi_heads.{name}" if name.startswith("res5.") else f"backbone.{name}"
        assert torch.equal(state[target], value), key


@pytest.mark.skipif(not HAS_D2, reason="Detectron2 is not installed (README: Detection)")
def test_config_files_hold_the_protocol_values():
    from detectron2.config import get_cfg

    from tasks.detection import d2_engine
    from tasks.detection.recipes import RECIPES

    for recipe in RECIPES.values():
        p = recipe.protocol
        cfg = get_cfg()
        cfg.merge_from_file(str(d2_engine.CONFIGS / recipe.d2_config))
        assert cfg.MODEL.MASK_ON == recipe.masks and cfg.MODEL.ROI_HEADS.NUM_CLASSES == recipe.classes
        assert all(cfg.MODEL[node].NORM == "SyncBN" for node in recipe.d2_head_norms)
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == p.train_sizes and cfg.INPUT.MIN_SIZE_TEST == p.test_size
        assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS), cfg.SOLVER.WARMUP_ITERS) == \
            (p.base_lr, p.max_iter, p.steps, p.warmup_iters)
        assert cfg.SOLVER.IMS_PER_BATCH == p.ims_per_batch and tuple(cfg.MODEL.PIXEL_MEAN) == p.pixel_mean
        assert cfg.MODEL.RPN.PRE_NMS_TOPK_TEST == p.rpn_pre_nms_topk_test
        assert cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION == p.pooler_resolution


needs_d2 = pytest.mark.skipif(not HAS_D2, reason="Detectron2 is not installed (README: Detection)")


def _d2_coco(out, *extra):
    return ["--ckpt", "random", "--arch", "resnet18", "--task", "coco_instseg", "--demo", "--out", str(out),
            "--set", "engine=detectron2", *SMALL, *THREE, *extra]


def _d2_final_weights(out):
    return torch.load(next((out / "state").glob("coco_instseg__*__detectron2")) / "model_final_with_precise_bn.pth",
                      weights_only=False)["model"]


@pytest.fixture(scope="module")
def d2_uninterrupted(tmp_path_factory, demo_root):
    out = tmp_path_factory.mktemp("d2_uninterrupted")
    assert cli(_d2_coco(out)) == 0
    return _record(out), _d2_final_weights(out)


@needs_d2
def test_detectron2_engine_demo_record(d2_uninterrupted):
    rec, _ = d2_uninterrupted
    assert rec["engine"] == "detectron2" and rec["probe"]["max_iter"] == 3
    assert {"coco_ap_box", "coco_ap_box50", "coco_ap_mask", "coco_ap_mask75"} <= set(rec["metrics"])


@needs_d2
def test_detectron2_resume_after_an_interruption_at_iteration_1_of_3_equals_the_uninterrupted_run(
        tmp_path, monkeypatch, d2_uninterrupted):
    from detectron2.checkpoint import DetectionCheckpointer

    save = DetectionCheckpointer.save

    def save_then_interrupt(self, name, **extra):
        save(self, name, **extra)
        raise KeyboardInterrupt

    monkeypatch.setattr(DetectionCheckpointer, "save", save_then_interrupt)
    assert cli(_d2_coco(tmp_path)) == 130
    monkeypatch.undo()
    folder = next((tmp_path / "state").glob("coco_instseg__*__detectron2"))
    assert (folder / "last_checkpoint").read_text() == "model_0000000.pth"  # after iteration 1 of 3
    first = (folder / "model_0000000.pth").stat().st_mtime_ns
    assert cli(_d2_coco(tmp_path, "--resume")) == 0
    assert (folder / "model_0000000.pth").stat().st_mtime_ns == first  # continued, not started over
    rec, weights = d2_uninterrupted
    _assert_same_weights(_d2_final_weights(tmp_path), weights)
    assert _record(tmp_path)["metrics"] == rec["metrics"]


# Run by torchrun: the suite's command line, each rank keeping the weights Detectron2 trained and the kinds of
# its norm layers.
D2_TORCHRUN_SCRIPT = """
import os
import sys
import torch
from evaluate.run import cli
from tasks.detection import d2_engine

train_worker = d2_engine._train_worker


def keeping(*args):
    model = train_worker(*args)
    model = getattr(model, "module", model)
    norms = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
    torch.save({"state": model.state_dict(), "parameters": dict(model.named_parameters()), "norms": norms},
               sys.argv[1] + "/rank" + os.environ["RANK"] + ".pt")
    return model


d2_engine._train_worker = keeping
sys.exit(cli(sys.argv[2:]))
"""


@needs_d2
def test_detectron2_engine_under_torchrun_trains_one_model_over_both_processes(tmp_path, demo_root):
    """2 Gloo processes as Detectron2's workers (no launch of its own): exit 0, one record of 2 processes,
    NaiveSyncBatchNorm in the model (BN over the global batch; PyTorch's SyncBN runs on CUDA only), the same
    trained parameters on both ranks (DDP averaged the gradients), which differ from the initial ones, and the
    same BN statistics but the mask head's running variances: precise BN (fvcore's update_bn_stats) undoes a
    Bessel correction with each rank's own batch size, and the ranks hold different numbers of positive RoIs
    (within 1%; it is so in Detectron2 on GPUs too, and rank 0's are saved).

    Not compared with one process: Detectron2's RPN / RoI sampling draws from each process's generator
    (seeded per iteration and rank), so two processes sample other proposals than one process does over the
    same images; the torchvision engine, which draws per image, is compared with one process above."""
    import os
    import pickle
    import subprocess
    import sys

    from core.files import REPO_ROOT

    (tmp_path / "script.py").write_text(D2_TORCHRUN_SCRIPT)
    args = _d2_coco(tmp_path / "out")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "script.py"), str(tmp_path), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("record:") == 1
    assert _record(tmp_path / "out")["data"]["processes"] == 2
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["norms"] == ranks[1]["norms"] == ["NaiveSyncBatchNorm"]
    _assert_same_weights(ranks[0]["parameters"], ranks[1]["parameters"])
    mask_head = {k: v for k, v in ranks[0]["state"].items() if k.startswith("roi_heads.mask_head.")}
    _assert_same_weights({k: v for k, v in ranks[0]["state"].items() if k not in mask_head},
                         {k: v for k, v in ranks[1]["state"].items() if k not in mask_head})
    for k, v in mask_head.items():
        assert torch.allclose(v.float(), ranks[1]["state"][k].float(), rtol=1e-2, atol=0), k
    folder = next((tmp_path / "out" / "state").glob("coco_instseg__*__detectron2"))
    initial = pickle.loads((folder / "init_weights.pkl").read_bytes())["model"]
    trained = ranks[0]["state"]
    changed = [k for k, v in initial.items() if not np.array_equal(trained["backbone.bottom_up." + k].numpy(), v)]
    assert changed and len(changed) >= len(initial) // 2


@needs_d2
def test_resumable_batches_are_detectron2s_aspect_ratio_grouping():
    """Against Detectron2's own AspectRatioGroupedDataset on the same per-process stream; a start skips batches."""
    from detectron2.data.common import AspectRatioGroupedDataset

    from core.sampling import epoch_order
    from tasks.detection.d2_engine import ResumableBatches

    records = [{"width": 4 + (i % 3 == 0) * 4, "height": 6} for i in range(10)]  # 4 of 10 landscape
    for rank, world in ((0, 1), (1, 2)):
        stream = [{"key": (e, i), **records[i]} for e in range(30) for i in epoch_order(10, 7, e).tolist()]
        grouped = AspectRatioGroupedDataset(stream[rank::world], batch_size=3)
        expected = [[d["key"] for d in b] for b in itertools.islice(grouped, 12)]
        batches = ResumableBatches(records, 3, 7, rank, world)
        assert list(itertools.islice(batches, 12)) == expected
        batches.start = 5
        assert list(itertools.islice(batches, 7)) == expected[5:]


@needs_d2
def test_detectron2_launch_meets_at_torchruns_address_else_a_free_port():
    from tasks.detection.d2_engine import dist_url

    assert dist_url({"MASTER_ADDR": "node17", "MASTER_PORT": "29400", "WORLD_SIZE": "1"}) == "tcp://node17:29400"
    assert dist_url({}) == "auto" and dist_url({"MASTER_ADDR": "node17"}) == "auto"


def _timm_vit(**kwargs):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=64, pretrained=False, **kwargs).eval()


@needs_d2
@pytest.mark.parametrize("kwargs", [{}, {"init_values": 0.5}], ids=["plain", "layerscale"])
def test_detectron2_vit_blocks_equal_timms_after_mapping(kwargs):
    """ViTDet's trunk with the mapped weights against timm's own modules on the same image: the patch tokens
    plus position embeddings (ViTDet drops the CLS token) and each block's output, with relative position
    biases on (zero-initialised, so they add nothing) and global attention (window attention is ViTDet's
    change to the network, not the mapping's); LayerScale folded into the layer before it."""
    from detectron2.modeling.backbone.utils import get_abs_pos

    from tasks.detection.vitdet_weights import build_detectron2_vit

    vit = _timm_vit(**kwargs)
    for b in vit.blocks:  # LayerScale and biases away from their initial values, so that a missed fold shows
        for name, t in b.named_parameters():
            if name.endswith(("gamma", "bias")):
                t.data.uniform_(-0.5, 1.0)
    net = build_detectron2_vit(vit, img_size=64, use_rel_pos=True, window_size=0).eval()
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = net.patch_embed(image) + get_abs_pos(net.pos_embed, net.pretrain_use_cls_token, (4, 4))
        theirs = vit.patch_embed(image) + vit.pos_embed[:, 1:]
        torch.testing.assert_close(ours.flatten(1, 2), theirs)
        for block, reference in zip(net.blocks, vit.blocks):
            ours, theirs = block(ours), reference(theirs)
            torch.testing.assert_close(ours.flatten(1, 2), theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net(image)["last_feat"].permute(0, 2, 3, 1).flatten(1, 2), theirs,
                                   rtol=1e-5, atol=1e-5)
    assert all(float(t.abs().max()) == 0 for n, t in net.named_parameters() if "rel_pos" in n)


@needs_d2
def test_detectron2_vit_mapping_lists_what_it_does_not_take_and_refuses_registers():
    from core.cli import UserError
    from tasks.detection.vitdet_weights import detectron2_vit_state, vit_arch

    state, dropped = detectron2_vit_state(_timm_vit(num_classes=10))
    assert dropped == {"cls_token": 1, "norm": 2, "head": 2} and "blocks.11.attn.qkv.weight" in state
    assert vit_arch(_timm_vit())["num_heads"] == 3 and vit_arch(_timm_vit())["pretrain_img_size"] == 64
    with pytest.raises(UserError, match="register tokens"):
        vit_arch(_timm_vit(reg_tokens=4))


def _vit_context(out, resume=False):
    """A run's context around a timm ViT (as backbones' ViT family gives it: `model.vit`)."""
    from pathlib import Path
    from types import SimpleNamespace

    from datasets.catalog import ensure_demo
    from tasks.context import RunContext

    model = torch.nn.Module()
    model.vit = _timm_vit()
    checkpoint = SimpleNamespace(family="vit", sha256="ab" * 32, path="random")
    return RunContext(model, checkpoint, "vit_tiny_patch16_224", ensure_demo(), torch.device("cpu"), 0, True, Path(out),
                      resume=resume)


def _vitdet_protocol(**extra):
    from dataclasses import replace

    from tasks.detection.recipes import COCO_FPN

    return replace(replace(COCO_FPN.protocol, **COCO_FPN.demo), **{
        "engine": "detectron2", "vitdet_image_size": 64, "vitdet_max_iter": 3, "vitdet_steps": (2,),
        "vitdet_warmup_iters": 1, "checkpoint_period": 1, "rpn_post_nms_topk_train": 20, "rpn_post_nms_topk_test": 10,
        "roi_batch_size_per_image": 16, **extra})


@needs_d2
def test_vitdet_recipe_values_reach_the_model_and_optimizer():
    """ViT-B's recipe at tiny scale: layer decay 0.7 per block from the top (patch and position embeddings one
    step below block 0, the pyramid and heads at the base lr), no weight decay on norms and pos_embed, drop
    path rising linearly to 0.1, global attention in the last block of each quarter, windows of 14."""
    from tasks.detection import vitdet

    p = _vitdet_protocol()
    vit = _timm_vit()
    model = vitdet.build_model(vit, p, 3, torch.device("cpu"))
    net = model.backbone.net
    assert [b.window_size for b in net.blocks] == [14, 14, 0] * 4
    assert [getattr(b.drop_path, "drop_prob", 0.0) for b in net.blocks] == pytest.approx(
        [0.1 * i / 11 for i in range(12)])
    opt = vitdet.optimizer(model, p, 12)
    setting = {id(q): (g["lr"], g["weight_decay"]) for g in opt.param_groups for q in g["params"]}
    names = dict(model.named_parameters())
    for name, expected_lr, expected_wd in [
            ("backbone.net.blocks.11.mlp.fc1.weight", 1e-4 * 0.7, 0.1),
            ("backbone.net.blocks.0.attn.qkv.weight", 1e-4 * 0.7 ** 12, 0.1),
            ("backbone.net.blocks.0.norm1.weight", 1e-4 * 0.7 ** 12, 0.0),
            ("backbone.net.patch_embed.proj.weight", 1e-4 * 0.7 ** 13, 0.1),
            ("backbone.net.pos_embed", 1e-4 * 0.7 ** 13, 0.0),
            ("roi_heads.box_predictor.cls_score.weight", 1e-4, 0.1)]:
        assert setting[id(names[name])] == pytest.approx((expected_lr, expected_wd)), name
    assert opt.defaults["betas"] == (0.9, 0.999)


@needs_d2
def test_vitdet_trains_scores_and_resumes_bit_equal(tmp_path, monkeypatch):
    """ViTDet end to end on the demo COCO (tiny ViT, 64 px), then the same run interrupted after iteration 1
    of 3 and resumed: the same final weights and metrics."""
    from detectron2.checkpoint import DetectionCheckpointer

    from tasks.detection import run as detection_run

    once = detection_run.run(_vit_context(tmp_path / "once"), _vitdet_protocol(), "coco_instseg")
    assert once.probe["detector"] == "vitdet" and {"coco_ap_box", "coco_ap_mask"} <= set(once.metrics)
    save = DetectionCheckpointer.save

    def save_then_interrupt(self, name, **extra):
        save(self, name, **extra)
        raise KeyboardInterrupt

    monkeypatch.setattr(DetectionCheckpointer, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        detection_run.run(_vit_context(tmp_path / "twice"), _vitdet_protocol(), "coco_instseg")
    monkeypatch.undo()
    logged = []
    ctx = _vit_context(tmp_path / "twice", resume=True)
    ctx.log = logged.append
    again = detection_run.run(ctx, _vitdet_protocol(), "coco_instseg")
    assert any("at iteration 1" in line for line in logged)
    final = [torch.load(next((tmp_path / d / "state").glob("*__vitdet")) / "model_final.pth", weights_only=False)
             for d in ("once", "twice")]
    _assert_same_weights(final[1]["model"], final[0]["model"])
    assert again.metrics == once.metrics


def test_a_vit_gets_one_sentence_for_voc_c4_and_for_the_torchvision_engine(tmp_path):
    from core.cli import UserError
    from tasks.detection import run as detection_run

    with pytest.raises(UserError, match="Faster R-CNN C4 is a ResNet recipe"):
        detection_run.run(_vit_context(tmp_path), _vitdet_protocol(), "voc_det")
    with pytest.raises(UserError, match="torchvision engine builds ResNet detectors only"):
        detection_run.run(_vit_context(tmp_path), _vitdet_protocol(engine="torchvision"), "coco_instseg")
    from dataclasses import replace

    under_torchrun = replace(_vit_context(tmp_path), rank=0, world=2)
    with pytest.raises(UserError, match="ViTDet runs in one process"):
        detection_run.run(under_torchrun, _vitdet_protocol(engine="detectron2"), "coco_instseg")


def test_engine_auto_takes_torchvision_for_a_resnet_detectron2s_c4_head_cannot_take(monkeypatch):
    """With Detectron2 importable, `auto` is Detectron2, but for a ResNet-18 on VOC's C4 recipe (its box head is
    a bottleneck res5) the torchvision engine, said in one line; an asked-for engine is never replaced."""
    from dataclasses import replace
    from types import SimpleNamespace

    from tasks.detection import run as detection_run
    from tasks.detection.recipes import RECIPES

    monkeypatch.setattr(detection_run.importlib.util, "find_spec", lambda name: object())  # "Detectron2 imports"
    said = []
    voc, coco = RECIPES["voc_det"], RECIPES["coco_instseg"]
    auto = replace(voc.protocol, engine="auto")
    ctx = lambda arch: SimpleNamespace(arch=arch, log=said.append)  # noqa: E731
    assert detection_run.choose_engine(ctx("resnet18"), auto, voc) == "torchvision"
    assert len(said) == 1 and "needs a ResNet-50 or deeper and this checkpoint is resnet18" in said[0]
    assert detection_run.choose_engine(ctx("resnet50"), auto, voc) == "detectron2"
    assert detection_run.choose_engine(ctx("resnet18"), replace(coco.protocol, engine="auto"), coco) == "detectron2"
    asked = replace(voc.protocol, engine="detectron2")
    assert detection_run.choose_engine(ctx("resnet18"), asked, voc) == "detectron2" and len(said) == 1
