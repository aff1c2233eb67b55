#!/usr/bin/env python
"""Write any supported checkpoint as a torchvision state dict, a safetensors file, or a Detectron2 backbone.

    python evaluate/convert.py --ckpt moco_v2_800ep.pth.tar --to torchvision --out r50_moco.pth
    python evaluate/convert.py --ckpt dino_full.pth --ckpt-key student --to safetensors --out r50.safetensors
    python evaluate/convert.py --ckpt r50_msbreg.pth --to detectron2 --out r50_msbreg.pkl

The input is read as `evaluate/run.py` reads it (the ResNet found by structure, strict architecture check);
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
    p.add_argument("--ckpt-key", help="which ResNet of the file (its location, as evaluate/run.py --inspect prints)")
    p.add_argument("--ckpt-part", help="older name of --ckpt-key")
    p.add_argument("--ckpt-format", help="treat the file as this project's release")
    args = p.parse_args(argv)
    if args.out.resolve() == Path(args.ckpt).resolve():
        raise UserError("--out must not overwrite the input checkpoint")
    model, info, arch = make_encoder(args.ckpt, args.arch, format_name=args.ckpt_format, part=args.ckpt_part,
                                     key=args.ckpt_key)
    if args.to == "detectron2" and (info.stem != "torchvision" or not info.maxpool):
        raise UserError(f"Detectron2's ResNet has torchvision's stem (7x7 convolution and max-pool), and this "
                        f"checkpoint's is {info.notes.get('stem', info.stem)}; it cannot be written for Detectron2")
    write_backbone({k: v.detach().clone() for k, v in model.state_dict().items()}, args.out, args.to)
    print(f"{info.path} (format {info.format}, {info.key}, {arch}) -> {args.out} ({args.to})")
    if info.stem == "3x3" and (not info.maxpool or info.stem_padding != 1):
        print(f"note: this model's stem is {info.notes['stem']}; the weights alone do not say so: evaluate the "
              f"converted file with --set maxpool={str(info.maxpool).lower()} --set stem_padding={info.stem_padding}")
    if info.input_normalization is not None:
        print(f"note: these weights expect input normalisation {info.normalization}; evaluate the converted file "
              f"with --set normalize=" + ("none" if info.input_normalization == ((0.0,) * 3, (1.0,) * 3) else
                                          ",".join(map(str, [*info.input_normalization[0],
                                                             *info.input_normalization[1]]))))
    return 0


def cli(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
