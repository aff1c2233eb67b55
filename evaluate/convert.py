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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones.checkpoints import make_encoder  # noqa: E402
from backbones.convert import TARGETS, write_backbone  # noqa: E402
from core.cli import ArgumentParser, UserError, run_cli  # noqa: E402


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
    model, info, arch = make_encoder(args.ckpt, args.arch, format_name=args.ckpt_format, part=args.ckpt_part)
    write_backbone({k: v.detach().clone() for k, v in model.state_dict().items()}, args.out, args.to)
    print(f"{info.path} (format {info.format}{', part ' + info.part if info.part else ''}, {arch}) -> "
          f"{args.out} ({args.to})")
    return 0


def cli(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
