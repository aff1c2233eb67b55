"""The batched augmentations against torchvision's per-image functions."""
import torch
from torchvision.transforms.v2 import functional as TF

from datasets.views import (ViewAugment, _blend, _blur, _gray, _shift_hue, augment_view, make_views,
                              random_resized_boxes)


def test_colour_ops_match_torchvision():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g)
    for i, (shift, factor) in enumerate([(0.1, 0.6), (-0.3, 1.4), (0.05, 1.0)]):
        img = x[i:i + 1]
        f = torch.tensor([factor])
        assert torch.allclose(_shift_hue(img, torch.tensor([shift])), TF.adjust_hue(img, shift), atol=1e-4)
        assert torch.allclose(_blend(img, _gray(img).expand_as(img), f), TF.adjust_saturation(img, factor), atol=1e-4)
        mean = _gray(img).mean(dim=(1, 2, 3), keepdim=True).expand_as(img)
        assert torch.allclose(_blend(img, mean, f), TF.adjust_contrast(img, factor), atol=1e-4)


def test_blur_matches_torchvision():
    x = torch.rand(4, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 1.0, 1.5, 2.0])
    out = _blur(x, sigma, 7)
    for i in range(4):
        assert torch.allclose(out[i], TF.gaussian_blur(x[i:i + 1], [7, 7], [sigma[i].item()] * 2)[0], atol=1e-4)


def test_random_resized_boxes_follow_torchvision_ranges():
    boxes = random_resized_boxes(2000, 64, (0.08, 1.0), torch.Generator().manual_seed(2), "cpu")
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all() and (w > 0).all() and (h > 0).all()
    area = w * h / 64 ** 2
    assert area.min() >= 0.07 and area.max() <= 1.0 and 0.4 < area.mean() < 0.7


def test_views_are_deterministic_by_generator_and_differ_between_views():
    imgs = (torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    augs = [ViewAugment(crop_size=24)] * 3
    a = make_views(imgs, augs, torch.Generator().manual_seed(7))
    b = make_views(imgs, augs, torch.Generator().manual_seed(7))
    assert a.shape == (3, 4, 3, 24, 24) and torch.equal(a, b) and not torch.equal(a[0], a[1])


def test_identity_settings_reproduce_a_plain_resize():
    imgs = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8)
    plain = ViewAugment(crop_size=32, crop_scale=(1.0, 1.0), flip_p=0, jitter_p=0, gray_p=0, blur_p=0, solarize_p=0)
    out = augment_view(imgs, plain, torch.Generator().manual_seed(0), mean=(0, 0, 0), std=(1, 1, 1))
    # At scale 1 the box is the whole square, and an equal-size resize is the identity.
    assert torch.allclose(out, imgs.float() / 255, atol=1e-4)
