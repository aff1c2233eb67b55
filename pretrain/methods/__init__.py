"""The pretraining methods, one module each; `METHODS` maps the config's `method` to its class."""
from core.cli import UserError
from pretrain.methods.barlowtwins import BarlowTwins
from pretrain.methods.byol import BYOL, BYOLMultiCrop, BYOLUniformity
from pretrain.methods.cpc import CPC
from pretrain.methods.drlim import DrLIM
from pretrain.methods.mocov2 import MoCoV2
from pretrain.methods.msbreg import MSBReg
from pretrain.methods.simclr import SimCLR, SimCLRv2
from pretrain.methods.wmse import WMSE

METHODS = {cls.name: cls for cls in (MSBReg, BYOL, BYOLMultiCrop, BYOLUniformity, SimCLR, SimCLRv2, MoCoV2,
                                      BarlowTwins, WMSE, DrLIM, CPC)}


def method_class(name: str):
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    return METHODS[name]


def build_method(cfg, world: int = 1):
    cls = method_class(cfg.method)
    cls.check(cfg)
    return cls(cfg, world)
