"""Detection: VOC AP against hand-computed cases, COCO metrics through pycocotools, data cleaning, the
torchvision engine end to end on the demo data, and the Detectron2 engine when it imports."""
import importlib.util
import json
from collections import Counter

import numpy as np
import pytest
import torch

from evaluate.run import cli
from tasks.detection.data import _clean
from tasks.detection.metrics import ap_11_point, coco_metrics, coco_results, encode_masks, voc_class_ap

HAS_D2 = importlib.util.find_spec("detectron2") is not None
TINY = ["--set", "max_iter=2", "--set", "steps=1", "--set", "warmup_iters=1", "--set", "precise_bn_iters=1"]


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


@pytest.mark.parametrize("task", ["voc_det", "coco_instseg"])
def test_torchvision_engine_demo_record(task, tmp_path, capsys, demo_root):
    code = cli(["--ckpt", "random", "--arch", "resnet18", "--task", task, "--demo", "--out", str(tmp_path),
                "--set", "engine=torchvision", *TINY])
    assert code == 0, capsys.readouterr().err
    path = next(p for p in (tmp_path / "records").rglob("*.json") if ".coco_results" not in p.name)
    rec = json.loads(path.read_text())
    assert rec["engine"] == "torchvision" and rec["data"]["trials"][0]["seed"] == 0
    names = ["voc_det_ap50", "voc_det_ap75", "voc_det_ap"] if task == "voc_det" else \
        ["coco_ap_box", "coco_ap_box50", "coco_ap_mask", "coco_ap_mask75"]
    assert all(0 <= rec["metrics"][n] <= 100 for n in names)
    if task == "coco_instseg":
        saved = path.with_name(rec["artifacts"]["coco_results_seed0.json"])
        assert isinstance(json.loads(saved.read_text()), list)
        assert rec["data"]["cleaning"]["train_images_without_objects_skipped"] >= 0


def test_resume_continues_from_the_saved_iteration(tmp_path, capsys, demo_root):
    args = ["--ckpt", "random", "--arch", "resnet18", "--task", "voc_det", "--demo", "--out", str(tmp_path),
            "--set", "engine=torchvision", "--set", "checkpoint_period=1", *TINY]
    assert cli(args) == 0
    state = next((tmp_path / "state").glob("voc_det__*.pt"))
    assert torch.load(state, weights_only=True)["iteration"] == 2
    assert cli(args + ["--resume"]) == 0
    assert "resumed" in capsys.readouterr().out


def test_torchvision_engine_under_torchrun(tmp_path, demo_root):
    """2 processes over Gloo: each trains on its share of the batch, rank 0 alone scores and writes."""
    import os
    import subprocess
    import sys

    from core.files import REPO_ROOT

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29519", str(REPO_ROOT / "evaluate" / "run.py"), "--ckpt", "random", "--arch", "resnet18",
                           "--task", "voc_det", "--demo", "--out", str(tmp_path), "--set", "engine=torchvision",
                           *TINY], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("record:") == 1
    rec = json.loads(next((tmp_path / "records").rglob("*.json")).read_text())
    assert rec["data"]["processes"] == 2 and 0 <= rec["metrics"]["voc_det_ap50"] <= 100
    assert torch.load(next((tmp_path / "state").glob("voc_det__*.pt")), weights_only=True)["iteration"] == 2


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


@pytest.mark.skipif(not HAS_D2, reason="Detectron2 is not installed (README: Detection)")
def test_detectron2_engine_demo_record(tmp_path, capsys, demo_root):
    code = cli(["--ckpt", "random", "--arch", "resnet50", "--task", "voc_det", "--demo", "--out", str(tmp_path),
                "--set", "engine=detectron2", *TINY, "--set", "max_iter=3", "--set", "steps=2"])
    assert code == 0, capsys.readouterr().err
    rec = json.loads(next((tmp_path / "records").rglob("*.json")).read_text())
    assert rec["engine"] == "detectron2" and 0 <= rec["metrics"]["voc_det_ap50"] <= 100
