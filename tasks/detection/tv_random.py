"""The torchvision detectors' random choices drawn per image, so that a training step does not depend on the
process count or on an interruption.

A torchvision detector draws three things from PyTorch's global generator in every training forward: each
image's training scale (`GeneralizedRCNNTransform.torch_choice`), the anchors the RPN samples and the
proposals the RoI head samples (`BalancedPositiveNegativeSampler`, once per image). With the global
generator these depend on how many images the process saw before (another process count, a resumed
run: other draws). Here each image carries `target["seeds"]` (three Python integers drawn by the dataset under
`core.sampling.SeededSamples`, hence fixed by (seed, pass, image)), and each choice is drawn from a
generator seeded with that image's own integer. Without seeds (inference, benchmarks) the global
generator is used as before.
"""
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.transform import GeneralizedRCNNTransform

SCALE, ANCHORS, PROPOSALS = range(3)  # which of an image's seeds each choice uses


def image_seeds() -> tuple:
    """An image's three seeds, drawn from the global generator (seeded per image by SeededSamples). Python
    integers, not a tensor, so that no copy to the GPU (and back) is made of them."""
    return tuple(torch.randint(0, 2 ** 62, (3,)).tolist())


def _generator(seed) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


class SeededTransform(GeneralizedRCNNTransform):
    """torchvision's transform choosing each training image's scale with that image's generator."""

    _generator = None

    def resize(self, image, target=None):
        if not (self.training and target is not None and "seeds" in target):
            return super().resize(image, target)
        self._generator = _generator(target["seeds"][SCALE])
        try:
            return super().resize(image, target)
        finally:
            self._generator = None

    def torch_choice(self, k):
        if self._generator is None:
            return super().torch_choice(k)
        return k[int(torch.randint(len(k), (1,), generator=self._generator))]


class SeededSampler(BalancedPositiveNegativeSampler):
    """torchvision's positive/negative sampler (the same counts: at most positive_fraction positives, negatives
    up to batch_size_per_image), each image's random subset drawn with that image's generator; `seeds` is set
    for each forward by a pre-hook on the module that owns the sampler."""

    def __init__(self, batch_size_per_image, positive_fraction, which):
        super().__init__(batch_size_per_image, positive_fraction)
        self.which, self.seeds = which, None

    def __call__(self, matched_idxs):
        if self.seeds is None:
            return super().__call__(matched_idxs)
        positives, negatives = [], []
        for matched, seeds in zip(matched_idxs, self.seeds):
            g = _generator(seeds[self.which])
            positive = torch.where(matched >= 1)[0]
            negative = torch.where(matched == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            # the permutations on the CPU (the generator's device), the indices then on the labels' device
            pos = positive[torch.randperm(positive.numel(), generator=g)[:num_pos].to(positive.device)]
            neg = negative[torch.randperm(negative.numel(), generator=g)[:num_neg].to(negative.device)]
            for chosen, out in ((pos, positives), (neg, negatives)):
                mask = torch.zeros_like(matched, dtype=torch.uint8)
                mask[chosen] = 1
                out.append(mask)
        return positives, negatives


def _targets_to_sampler(module, args):
    """Forward pre-hook of the RPN / RoI heads: their sampler takes the images' seeds (targets: last argument)."""
    targets = args[-1] if args else None
    sampler = module.fg_bg_sampler
    sampler.seeds = ([t["seeds"] for t in targets]
                     if module.training and targets is not None and all("seeds" in t for t in targets) else None)


def seed_per_image(model):
    """A torchvision FasterRCNN / MaskRCNN made to draw its random choices per image (in place)."""
    t = model.transform
    model.transform = SeededTransform(t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible,
                                      t.fixed_size)
    for module, which in ((model.rpn, ANCHORS), (model.roi_heads, PROPOSALS)):
        old = module.fg_bg_sampler
        module.fg_bg_sampler = SeededSampler(old.batch_size_per_image, old.positive_fraction, which)
        module.register_forward_pre_hook(_targets_to_sampler)
    return model
