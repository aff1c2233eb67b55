"""Views of images: Table 9's training augmentations on batched uint8 tensors (run on the accelerator), and
the evaluation transform of the frozen-feature tasks.

An image is decoded once (a uint8 tensor, `decode_size` square) and `make_views` draws K views of
the whole batch from it. All randomness comes from one `torch.Generator`, so a step's views depend
only on (seed, step). Per-view settings: a value given as a tuple of length K applies per view
(e.g. BYOL's asymmetric blur (1.0, 0.1) and solarisation (0.0, 0.2)); a single value to all.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.ops import roi_align

from core.cli import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class EvalTransform:
    """Resize the short side to `resize`, then either centre-crop `crop` or resize to a `square` x `square` image
    (aspect ratio not kept: Goyal et al.'s and VISSL's VOC07 transform), normalise: the test-time transform of
    every frozen-feature task."""

    resize: int
    crop: int
    mean: tuple
    std: tuple
    interpolation: str = "bilinear"
    square: int = 0

    def build(self):
        if self.interpolation not in INTERPOLATION:
            raise UserError(f"interpolation must be one of {', '.join(INTERPOLATION)}, not {self.interpolation!r}")
        mode = INTERPOLATION[self.interpolation]
        steps = [T.Resize(self.resize, mode)]
        if self.square:
            steps.append(T.Resize((self.square, self.square), mode))
        if self.crop:
            steps.append(T.CenterCrop(self.crop))
        return T.Compose(steps + [T.ToTensor(), T.Normalize(self.mean, self.std)])

    def describe(self) -> str:
        return (f"resize{self.resize}-{self.interpolation}" + (f"-square{self.square}" if self.square else "")
                + f"-crop{self.crop}-mean{','.join(map(str, self.mean))}-std{','.join(map(str, self.std))}")


@dataclass(frozen=True)
class ViewAugment:
    crop_size: int = 224
    crop_scale: tuple = (0.08, 1.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.2


def _uniform(n, lo, hi, g, device):
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def random_resized_boxes(n, size, scale, g, device, ratio=(3 / 4, 4 / 3), tries=10):
    """torchvision's RandomResizedCrop box sampling, vectorised: (n, 4) boxes x0, y0, x1, y1 in pixels."""
    area = size * size
    target = area * _uniform(n * tries, scale[0], scale[1], g, device)
    log_r = _uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), g, device)
    aspect = log_r.exp()
    w = (target * aspect).sqrt().round()
    h = (target / aspect).sqrt().round()
    ok = ((w <= size) & (h <= size) & (w > 0) & (h > 0)).view(n, tries)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros(n, dtype=torch.long, device=device))
    pick = torch.arange(n, device=device) * tries + first
    w, h = w[pick], h[pick]
    # No valid try: the whole image (the images are square, so torchvision's fallback is the full square).
    w = torch.where(ok.any(1), w, torch.full_like(w, size))
    h = torch.where(ok.any(1), h, torch.full_like(h, size))
    x0 = (torch.rand(n, generator=g, device=device) * (size - w + 1)).floor()
    y0 = (torch.rand(n, generator=g, device=device) * (size - h + 1)).floor()
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


def _gray(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(a, b, factor):
    return (factor[:, None, None, None] * a + (1 - factor[:, None, None, None]) * b).clamp(0, 1)


def _shift_hue(x, shift):
    """Rotate hue by `shift` (fraction of a turn, per image) through HSV, as torchvision's adjust_hue."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    h = (h + shift[:, None, None]) % 1.0
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    v = maxc
    k = lambda n: (n + h * 6) % 6  # noqa: E731
    f = lambda n: v - v * s * torch.clamp(torch.minimum(k(n), 4 - k(n)), 0, 1)  # noqa: E731
    return torch.stack([f(5), f(3), f(1)], 1)


def _blur(x, sigma, kernel_size):
    """Gaussian blur with one sigma per image (separable, depthwise)."""
    n, c, hgt, wid = x.shape
    half = kernel_size // 2
    t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, ks)
    y = x.reshape(1, n * c, hgt, wid)
    y = F.conv2d(F.pad(y, (half, half, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, half, half), mode="reflect"), k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, hgt, wid)


def augment_view(images_u8, aug: ViewAugment, g, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """One augmented view of every image: uint8 (B, 3, S, S) -> normalised float (B, 3, crop, crop)."""
    b, _, size, _ = images_u8.shape
    device = images_u8.device
    x = images_u8.float() / 255
    boxes = random_resized_boxes(b, size, aug.crop_scale, g, device)
    rois = torch.cat([torch.arange(b, device=device, dtype=x.dtype)[:, None], boxes.to(x.dtype)], 1)
    # sampling_ratio=0: ceil(box / crop) bilinear samples per output pixel, i.e. plain bilinear when
    # enlarging and an area-average (antialiased) resize when shrinking, as PIL resizing does.
    x = roi_align(x, rois, output_size=aug.crop_size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    flip = torch.rand(b, generator=g, device=device) < aug.flip_p
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    # Colour jitter in torchvision's order brightness, contrast, saturation, hue (fixed order here).
    jit = torch.rand(b, generator=g, device=device) < aug.jitter_p
    one = torch.ones(b, device=device)
    bri = torch.where(jit, _uniform(b, 1 - aug.brightness, 1 + aug.brightness, g, device), one)
    con = torch.where(jit, _uniform(b, 1 - aug.contrast, 1 + aug.contrast, g, device), one)
    sat = torch.where(jit, _uniform(b, 1 - aug.saturation, 1 + aug.saturation, g, device), one)
    hue = torch.where(jit, _uniform(b, -aug.hue, aug.hue, g, device), torch.zeros(b, device=device))
    x = (x * bri[:, None, None, None]).clamp(0, 1)
    x = _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), con)
    x = _blend(x, _gray(x).expand_as(x), sat)
    x = torch.where(jit[:, None, None, None], _shift_hue(x, hue), x)
    gray = torch.rand(b, generator=g, device=device) < aug.gray_p
    x = torch.where(gray[:, None, None, None], _gray(x).expand_as(x), x)
    # Blur: sigma in [0.1, 2.0] px at 224 px in BYOL and SimCLR, kernel 10% of the crop.
    blur = torch.rand(b, generator=g, device=device) < aug.blur_p
    sigma = _uniform(b, aug.blur_sigma[0], aug.blur_sigma[1], g, device)
    kernel = max(3, int(0.1 * aug.crop_size) // 2 * 2 + 1)
    x = torch.where(blur[:, None, None, None], _blur(x, sigma, kernel), x)
    sol = torch.rand(b, generator=g, device=device) < aug.solarize_p
    x = torch.where(sol[:, None, None, None] & (x >= 0.5), 1 - x, x)
    m = torch.tensor(mean, device=device, dtype=x.dtype)[None, :, None, None]
    s = torch.tensor(std, device=device, dtype=x.dtype)[None, :, None, None]
    return (x - m) / s


def make_views(images_u8, augs, g):
    """K views (one ViewAugment each) of the batch: (K, B, 3, crop, crop)."""
    return torch.stack([augment_view(images_u8, a, g) for a in augs])
