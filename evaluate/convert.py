#!/usr/bin/env python
"""Write any supported checkpoint as a torchvision state dict, a safetensors file, or a Detectron2 backbone.

    python evaluate/convert.py --ckpt moco_v2_800ep.pth.tar --to torchvision --out r50_moco.pth
    python evaluate/convert.py --ckpt dino_full.pth --ckpt-part student --to safetensors --out r50.safetensors
    python evaluate/convert.py --ckpt r50_msbreg.pth --to detectron2 --out r50_msbreg.pkl

The input is read as `evaluate/run.py` reads it (format detection, strict architecture check);
outputs are written atomically. A Detectron2 file is a pickle of numpy arrays under 'model' with
Detectron2's names (stem, res2-res5, shortcut, norms) and `matching_heuristics`, as MoCo's converter
writes it; it takes RGB input normalised like torchvision's (set the detector's PIXEL_MEAN/STD).
Exit codes: 0 done, 2 the user's mistake, 1 a bug.
"""
import io
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluate.common import ArgumentParser, UserError, atomic_torch_save, atomic_write_bytes, run_cli  # noqa: E402

TARGETS = ("torchvision", "safetensors", "detectron2")


def backbone_state(ckpt, arch=None, format_name=None, part=None):
    """The checkpoint's backbone as a strict torchvision state dict (through the evaluation loader)."""
    from evaluate.checkpoints import make_encoder

    model, info, arch = make_encoder(ckpt, arch, format_name=format_name, part=part)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, info, arch


def to_detectron2(state: dict) -> dict:
    from evaluate.formats import torchvision_to_detectron2_key

    model = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        name = torchvision_to_detectron2_key(k)
        if name is None:
            raise UserError(f"cannot name {k} in Detectron2's ResNet")
        model[name] = v.numpy()
    return {"model": model, "__author__": "ssl-transfer (torchvision conversion)", "matching_heuristics": True}


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--to", required=True, choices=TARGETS)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--arch")
    p.add_argument("--ckpt-format")
    p.add_argument("--ckpt-part")
    args = p.parse_args(argv)
    if args.out.resolve() == Path(args.ckpt).resolve():
        raise UserError("--out must not overwrite the input checkpoint")
    state, info, arch = backbone_state(args.ckpt, args.arch, args.ckpt_format, args.ckpt_part)
    if args.to == "torchvision":
        atomic_torch_save(state, args.out)
    elif args.to == "safetensors":
        from safetensors.torch import save

        atomic_write_bytes(args.out, save({k: v.contiguous() for k, v in state.items()}))
    else:
        buf = io.BytesIO()
        pickle.dump(to_detectron2(state), buf, protocol=4)
        atomic_write_bytes(args.out, buf.getvalue())
    print(f"{info.path} (format {info.format}{', part ' + info.part if info.part else ''}, {arch}) -> "
          f"{args.out} ({args.to})")
    return 0


def cli(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
