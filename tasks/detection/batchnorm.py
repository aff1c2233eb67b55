"""BatchNorm over the global batch when the torchvision engine runs on several processes.

MoCo's recipe trains with SyncBN (detection/configs/Base-RCNN-C4-BN.yaml: NORM "SyncBN"): every norm layer
normalises with the statistics of the whole global batch. On CUDA that is `torch.nn.SyncBatchNorm`; on
CPU processes (torchrun over Gloo: the tests, the CPU demo) PyTorch's SyncBatchNorm does not run, so
`GlobalBatchNorm2d` does the same with two all-reduces: the global mean, then the global mean squared
deviation (two passes, as `F.batch_norm` computes the variance), both differentiable
(`torch.distributed.nn.functional.all_reduce`, whose backward all-reduces the gradients), and updates the
running statistics exactly as BatchNorm2d does (biased variance to normalise, unbiased to track).
"""
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch summed over all processes."""

    def forward(self, x):
        if not (self.training and _distributed()):
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        count = x.new_tensor([x.numel() / x.shape[1]])
        total = all_reduce(torch.cat([x.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = x - mean[None, :, None, None]
        var = all_reduce(centred.square().sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=factor)
        scale = torch.rsqrt(var + self.eps)
        out = centred * scale[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out


def global_batchnorm(model: nn.Module, device) -> nn.Module:
    """The model with every BatchNorm synchronised over the processes (the same parameters and buffers):
    torch's SyncBatchNorm on CUDA, GlobalBatchNorm2d elsewhere."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model)


def _convert(module):
    if type(module) is nn.BatchNorm2d:
        out = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        module.add_module(name, _convert(child))
    return module
