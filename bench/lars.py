#!/usr/bin/env python
"""LARS step time: the vectorised update (pretrain.optim.LARS: foreach norms, one `where` for every trust
ratio) beside the update it replaced (the same foreach calls, but one `torch.where` per tensor in a Python
loop), on the parameters of a ResNet-18 and a ResNet-50 (with their BYOL weight / bias groups).

    python bench/lars.py                    # CPU, and CUDA when there is one
    python bench/lars.py --steps 50 --device cuda

Prints, per network and device, ms per step of each and the ratio (the result; absolute times depend on
the machine). Both are checked to give the same parameters before timing.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from backbones.resnet import build_backbone  # noqa: E402
from pretrain.optim import LARS, lars_param_groups  # noqa: E402


class PerTensorLARS(LARS):
    """The update before it was vectorised: a Python loop of torch.where, one per tensor, for the trust ratios."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad for p in params]
            if group["lars"]:
                updates = torch._foreach_add(updates, params, alpha=group["weight_decay"])
                w_norms, u_norms = torch._foreach_norm(params), torch._foreach_norm(updates)
                trust = [torch.where((w > 0) & (u > 0), group["trust_coefficient"] * w / u, torch.ones_like(w))
                         for w, u in zip(w_norms, u_norms)]
                updates = torch._foreach_mul(updates, trust)
            carried = [(self.state[p]["momentum_buffer"], u) for p, u in zip(params, updates)
                       if "momentum_buffer" in self.state[p]]
            for p, u in zip(params, updates):
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = u.clone()
            if carried:
                bufs, ups = zip(*carried)
                torch._foreach_mul_(list(bufs), group["momentum"])
                torch._foreach_add_(list(bufs), list(ups))
            torch._foreach_add_(params, [self.state[p]["momentum_buffer"] for p in params], alpha=-group["lr"])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(cls, arch, device, steps):
    torch.manual_seed(0)
    net = build_backbone(arch).to(device)
    params = list(net.named_parameters())
    for _, p in params:
        p.grad = torch.randn_like(p) * 1e-2
    opt = cls(lars_param_groups(params), lr=0.1, momentum=0.9, weight_decay=1e-5, trust_coefficient=1e-3)
    opt.step()  # the momentum buffers exist from here on
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync(device)
    return (time.perf_counter() - start) / steps * 1e3, [p.detach() for _, p in params]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", action="append", help="cpu, cuda (default: cpu, and cuda when available)")
    parser.add_argument("--arch", action="append", help="default: resnet18 and resnet50")
    args = parser.parse_args(argv)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"{'network':10} {'device':6} {'tensors':>7} {'per-tensor ms':>14} {'vectorised ms':>14} {'speed-up':>9}")
    for arch in args.arch or ["resnet18", "resnet50"]:
        for name in devices:
            device = torch.device(name)
            old_ms, old = time_steps(PerTensorLARS, arch, device, args.steps)
            new_ms, new = time_steps(LARS, arch, device, args.steps)
            for a, b in zip(old, new):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            print(f"{arch:10} {name:6} {len(new):7d} {old_ms:14.2f} {new_ms:14.2f} {old_ms / new_ms:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
