"""Writing a backbone in other forms: torchvision state dict, safetensors, Detectron2's names and pickle."""
import io
import pickle

from backbones.schemes import torchvision_to_detectron2_key
from core.cli import UserError
from core.files import atomic_torch_save, atomic_write_bytes

TARGETS = ("torchvision", "safetensors", "detectron2")


def detectron2_state(state: dict) -> dict:
    """A torchvision ResNet state dict under Detectron2's names (stem, res2-res5, shortcut, norms), as numpy
    arrays, in the dict form Detectron2's checkpointer matches by suffix (MoCo's converter writes the same)."""
    model = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        name = torchvision_to_detectron2_key(k)
        if name is None:
            raise UserError(f"cannot name {k} in Detectron2's ResNet")
        model[name] = v.detach().cpu().numpy()
    return {"model": model, "__author__": "ssl-transfer (torchvision conversion)", "matching_heuristics": True}


def write_backbone(state: dict, path, to: str) -> None:
    """`state` (a torchvision ResNet state dict) written atomically as `to` (one of TARGETS)."""
    if to == "torchvision":
        atomic_torch_save(state, path)
    elif to == "safetensors":
        from safetensors.torch import save

        atomic_write_bytes(path, save({k: v.contiguous() for k, v in state.items()}))
    elif to == "detectron2":
        buf = io.BytesIO()
        pickle.dump(detectron2_state(state), buf, protocol=4)
        atomic_write_bytes(path, buf.getvalue())
    else:
        raise UserError(f"unknown target {to!r}; one of {', '.join(TARGETS)}")
