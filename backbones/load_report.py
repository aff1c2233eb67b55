"""What a load took from a file, for every family: the network's tensors that came from it against those it
expects, and the file's tensors left unused, counted by what they are.

Groups (judged by the names that set a tensor apart from the chosen network's location):
- heads: projection / prediction heads, classifiers, prototypes (MoCo v3's projection MLP, DINO's head);
- optimizer: optimizer and loss-scaler state;
- ema_teacher_momentum: the file's other copy of the network (momentum encoder, EMA, target, a student
  beside the evaluated teacher) and everything under it;
- decoder: MAE's decoder (decoder_* and its mask_token);
- other: the rest (queues, loss centres, mask tokens of the pretraining objective, ...).
"""
import re

from backbones.discovery import tensor_dicts

GROUPS = ("heads", "optimizer", "ema_teacher_momentum", "decoder", "other")
OPTIMIZER = {"optimizer", "optimizers", "optimizer_states", "optim", "scaler", "fp16_scaler", "grad_scaler",
             "lr_scheduler", "lr_schedulers", "param_schedulers", "amp"}
COPY = re.compile(r"^(momentum_.*|.*_momentum|.*momentum_encoder|ema_.*|.*_ema|encoder_k|key_.*|target.*|.*_target|"
                  r"teacher.*|.*_teacher|model_t|student.*|.*_student|head_t|model_ema)$")
HEAD = re.compile(r"^(head|heads|fc|projector|projection|projection_head|predictor|prediction_head|prototypes|"
                  r"classifier|last_layer|last_layer2|neck|head_dist|fc_norm|pred|online_classifier|clf|bn)$")


def group_of(rel: list, has_decoder: bool) -> str:
    """The group of an unused tensor from the names that follow what it shares with the chosen network."""
    if any(n in OPTIMIZER for n in rel[:2]):
        return "optimizer"
    if rel and COPY.match(rel[0]):
        return "ema_teacher_momentum"
    if any(n.startswith("decoder") for n in rel) or (has_decoder and rel[-1:] == ["mask_token"]):
        return "decoder"
    if any(HEAD.match(n) for n in rel[:-1]):
        return "heads"
    return "other"


def load_report(obj, container: tuple, prefix: str, taken: set, expected: int, loaded: int) -> dict:
    """{tensors_loaded, tensors_expected, unused: {group: count}} for the network taken from `container` (keys
    `taken`, their names starting with `prefix`)."""
    location = [str(c) for c in container] + [p for p in prefix.split(".") if p]
    unused = {}
    dicts = list(tensor_dicts(obj))
    has_decoder = any(isinstance(k, str) and "decoder" in k for _, d in dicts for k in d)
    for path, d in dicts:
        for k, v in d.items():
            if not isinstance(k, str) or not hasattr(v, "shape") or (tuple(path) == tuple(container) and k in taken):
                continue
            if len(v.shape) == 0 and not k.endswith("num_batches_tracked"):
                continue  # a scalar beside the weights (an epoch counter, best_acc1), not a weight
            names = [str(p) for p in path] + k.split(".")
            common = 0
            while common < min(len(names) - 1, len(location)) and names[common] == location[common]:
                common += 1
            group = group_of(names[common:], has_decoder)
            unused[group] = unused.get(group, 0) + 1
    return {"tensors_loaded": loaded, "tensors_expected": expected,
            "unused": {g: unused[g] for g in GROUPS if g in unused}}


def describe(report) -> str:
    if not report:
        return "random initialisation (nothing loaded)"
    text = f"{report['tensors_loaded']} of {report['tensors_expected']} tensors loaded"
    if report["unused"]:
        text += "; unused in the file: " + ", ".join(f"{g} {n}" for g, n in report["unused"].items())
    return text
