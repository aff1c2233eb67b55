"""`voc_det` and `coco_instseg`: finetune a detector from the checkpoint, score it on the test split.

The engine is Detectron2 when it imports (protocol `engine=auto`), else torchvision; `--set engine=`
chooses. Each trial (seed) trains from the checkpoint and keeps its state under `<out>/state/`, so
`--resume` continues an interrupted run. Both engines run under torchrun (one process per GPU, one
node or several); with plain python on a machine with several GPUs Detectron2's engine starts its own
process per GPU. ViTDet (a ViT's coco_instseg) runs in one process. With trials > 1 the record holds
every trial and the mean and std of each metric (MoCo reports VOC as the mean of 5).
"""
import importlib.util

import numpy as np
import torch

from core.cli import UserError
from core.resume import StateFile
from tasks.context import NOTHING, TaskOutput
from tasks.detection.data import load_task_data
from tasks.detection.recipes import RECIPES

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def resolve_engine(name):
    has_d2 = importlib.util.find_spec("detectron2") is not None
    if name == "auto":
        return "detectron2" if has_d2 else "torchvision"
    if name == "detectron2" and not has_d2:
        raise UserError("engine=detectron2 was asked for, but Detectron2 does not import; install it (README: "
                        "Detection) or use --set engine=torchvision")
    if name not in ("detectron2", "torchvision"):
        raise UserError(f"engine must be auto, detectron2 or torchvision, not {name!r}")
    return name


def choose_engine(ctx, p, recipe):
    """The engine of this run: `engine=` resolved, and with `auto` the torchvision engine for a ResNet that
    Detectron2's recipe cannot take (its C4 box head is a bottleneck res5: ResNet-50 or deeper), saying so."""
    engine = resolve_engine(p.engine)
    depth = int(ctx.arch[len("resnet"):]) if ctx.arch in TORCHVISION_RESNETS else None
    if p.engine == "auto" and engine == "detectron2" and depth is not None and depth < recipe.d2_min_depth:
        ctx.log(f"  engine=auto: torchvision, as Detectron2's {recipe.detector} needs a ResNet-{recipe.d2_min_depth} "
                f"or deeper and this checkpoint is {ctx.arch}")
        return "torchvision"
    return engine


TORCHVISION_VIT = ("the torchvision engine builds ResNet detectors only (it has no simple feature pyramid for a "
                   "ViT); a ViT's detection is ViTDet through Detectron2: coco_instseg with --set engine=detectron2")


def is_vit(ctx) -> bool:
    return getattr(ctx.checkpoint, "family", None) == "vit" or hasattr(ctx.model, "vit")


def check_vit(recipe, engine):
    if recipe.vit_refusal:
        raise UserError(recipe.vit_refusal)
    if engine != "detectron2":
        raise UserError(TORCHVISION_VIT)


def check_arch(ctx, p, recipe, engine):
    task = recipe.task
    if ctx.checkpoint.stem != "torchvision" or not ctx.checkpoint.maxpool:
        raise UserError(f"{task} builds its detector on torchvision's ResNet stem (7x7 convolution and max-pool), "
                        f"and this checkpoint's stem is {ctx.checkpoint.notes.get('stem', ctx.checkpoint.stem)}")
    if ctx.arch not in TORCHVISION_RESNETS:
        raise UserError(f"{task} builds its detector from a torchvision ResNet ({', '.join(TORCHVISION_RESNETS)}); "
                        f"this checkpoint is {ctx.arch}")
    if p.arch != "any" and ctx.arch != p.arch:
        raise UserError(f"{task}'s recipe needs a {p.arch} backbone (paper §8.4) and this checkpoint is {ctx.arch}; "
                        "--set arch=any runs it anyway, outside the paper's protocol")
    if engine == "detectron2" and int(ctx.arch[len("resnet"):]) < recipe.d2_min_depth:
        raise UserError(f"Detectron2's {recipe.detector} needs a ResNet-{recipe.d2_min_depth} or deeper (its C4 box "
                        "head is a bottleneck res5); use --set engine=torchvision for this checkpoint")


def _trial(ctx, p, recipe, engine, train, test, classes, seed):
    if is_vit(ctx):
        from tasks.detection import vitdet

        return vitdet.train_and_predict(ctx, p, recipe, train, test, classes, seed,
                                        ctx.state_path(recipe.task, seed, suffix="__vitdet"))
    if engine == "torchvision":
        from tasks.detection import tv_engine

        torch.manual_seed(seed)
        model = tv_engine.build(recipe, ctx.model, len(classes), p)
        state = StateFile(ctx.state_path(recipe.task, seed), ctx.resume, repr(p))
        model = tv_engine.train(model, train, p, recipe, ctx.device, seed, state, ctx.log, ctx.rank, ctx.world)
        return tv_engine.predict(model, test, p, ctx.device) if ctx.rank == 0 else None
    from tasks.detection import d2_engine

    return d2_engine.train_and_predict(ctx, p, recipe, train, test, classes, seed,
                                       ctx.state_path(recipe.task, seed, suffix="__detectron2"))


def run(ctx, p, task_name) -> TaskOutput:
    recipe = RECIPES[task_name]
    if is_vit(ctx) and recipe.vit_refusal:  # whatever the engine, and whether or not Detectron2 imports
        raise UserError(recipe.vit_refusal)
    if ctx.world > 1 and is_vit(ctx):
        raise UserError("ViTDet runs in one process (on one GPU): run it with plain python, not torchrun")
    engine = choose_engine(ctx, p, recipe)
    if is_vit(ctx):
        check_vit(recipe, engine)
    else:
        check_arch(ctx, p, recipe, engine)
    if p.trials < 1:
        raise UserError("trials must be at least 1")
    train, test, classes, counts, coco = load_task_data(recipe, p, ctx.data_root)
    trials, artifacts = [], {}
    for t in range(p.trials):
        seed = ctx.seed + t
        ctx.log(f"  {engine} engine, trial {t + 1}/{p.trials} (seed {seed}), {len(train)} training images")
        predictions = _trial(ctx, p, recipe, engine, train, test, classes, seed)
        if predictions is None:
            continue  # under torchrun, rank 0 scores and records
        metrics, extra, files = recipe.score(predictions, test, classes, coco, seed)
        artifacts.update(files)
        trials.append({"seed": seed, "metrics": metrics, **extra})
    if ctx.rank != 0:
        return NOTHING
    names = list(trials[0]["metrics"])
    mean = {k: float(np.mean([tr["metrics"][k] for tr in trials])) for k in names}
    info = {"processes": ctx.world, "train_images": len(train), "test_images": len(test),
            "cleaning": dict(counts), "trials": trials}
    if p.trials > 1:
        info["std"] = {k: float(np.std([tr["metrics"][k] for tr in trials])) for k in names}
    return TaskOutput({recipe.metric_prefix + k: v for k, v in mean.items()}, info, engine=engine, artifacts=artifacts,
                      probe={"engine": engine, "max_iter": p.max_iter, "trials": p.trials,
                             **({"detector": "vitdet", "max_iter": p.vitdet_max_iter} if is_vit(ctx) else {})})
