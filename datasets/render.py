"""Procedural images for the demo datasets.

Class identity is carried by a shape (12 polygons) and a fill texture (12 patterns, each unchanged
by a horizontal flip), a distinct pair per class; colours, texture period, position, scale, rotation,
blur and background are nuisances. A good encoder therefore separates classes
that a random one mixes up, and every object has an exact polygon, mask and box for detection.
"""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Vertices on the unit circle (radius 1) before rotation and scaling; all are simple polygons.
def _regular(n, phase=0.0):
    return [(math.cos(phase + 2 * math.pi * i / n), math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]


def _star(points=5, inner=0.45):
    out = []
    for i in range(2 * points):
        r = 1.0 if i % 2 == 0 else inner
        a = math.pi * i / points - math.pi / 2
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


SHAPES = {
    "circle": _regular(32),
    "square": _regular(4, math.pi / 4),
    "triangle": _regular(3, -math.pi / 2),
    "cross": [(-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1), (-.3, 1), (-.3, .3),
              (-1, .3), (-1, -.3), (-.3, -.3)],
    "star": _star(),
    "diamond": [(0, -1), (.55, 0), (0, 1), (-.55, 0)],
    "hexagon": _regular(6),
    "pentagon": _regular(5, -math.pi / 2),
    "arrow": [(-1, -.3), (.2, -.3), (.2, -.8), (1, 0), (.2, .8), (.2, .3), (-1, .3)],
    "ell": [(-.8, -1), (-.2, -1), (-.2, .4), (.8, .4), (.8, 1), (-.8, 1)],
    "tee": [(-1, -1), (1, -1), (1, -.45), (.3, -.45), (.3, 1), (-.3, 1), (-.3, -.45), (-1, -.45)],
    "bowtie": [(-1, -.8), (0, -.15), (1, -.8), (1, .8), (0, .15), (-1, .8)],
}
SHAPE_NAMES = list(SHAPES)

# Fill patterns, unchanged by a horizontal flip (the augmentations flip); `p` is the period in pixels.
TEXTURES = {
    "solid": lambda xx, yy, cx, cy, p: np.ones_like(xx, bool),
    "hstripes": lambda xx, yy, cx, cy, p: (yy // p) % 2 == 0,
    "vstripes": lambda xx, yy, cx, cy, p: (xx // p) % 2 == 0,
    "checker": lambda xx, yy, cx, cy, p: ((xx // p) + (yy // p)) % 2 == 0,
    "dots": lambda xx, yy, cx, cy, p: ((xx % (2 * p)) - p) ** 2 + ((yy % (2 * p)) - p) ** 2 > (0.6 * p) ** 2,
    "grid": lambda xx, yy, cx, cy, p: (xx % (2 * p) >= 2) & (yy % (2 * p) >= 2),
    "crosshatch": lambda xx, yy, cx, cy, p: (((xx + yy) // p) % 2 == 0) ^ (((xx - yy) // p) % 2 == 0),
    "rings": lambda xx, yy, cx, cy, p: (np.hypot(xx - cx, yy - cy) // p) % 2 == 0,
    "speckle": None,  # random pixels, drawn with the generator
    "sectors": lambda xx, yy, cx, cy, p: (np.floor(np.arctan2(yy - cy, np.abs(xx - cx)) / (np.pi / 4)) % 2) == 0,
    "outline": None,  # the polygon's border only
    "ramp": None,  # a linear blend between the two colours
}
TEXTURE_NAMES = list(TEXTURES)


def class_style(cls: int):
    """Class index -> (shape name, texture name); the first 144 classes get distinct pairs."""
    n = len(SHAPE_NAMES)
    return SHAPE_NAMES[cls % n], TEXTURE_NAMES[(cls + cls // n) % n]


def _random_colour(rng, avoid=None):
    while True:
        c = rng.integers(0, 256, size=3)
        if avoid is None or np.abs(c.astype(int) - np.asarray(avoid, int)).sum() > 180:
            return tuple(int(v) for v in c)


def background(rng, width, height):
    """A smooth random colour field with pixel noise."""
    base = rng.integers(0, 256, size=3)
    low = rng.integers(-60, 60, size=(4, 4, 3)) + base
    img = Image.fromarray(np.clip(low, 0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, size=(height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), tuple(int(v) for v in base)


def polygon(shape, cx, cy, radius, angle):
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + radius * (x * ca - y * sa), cy + radius * (x * sa + y * ca)) for x, y in SHAPES[shape]]


def draw_object(img, poly, colour, texture, rng):
    """Paint `poly` with `texture` onto `img` in place; return its boolean mask (H, W)."""
    w, h = img.size
    mask_img = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask_img).polygon(poly, fill=255)
    other = np.asarray(_random_colour(rng, avoid=colour), np.float32)
    first = np.asarray(colour, np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = np.mean([p[0] for p in poly]), np.mean([p[1] for p in poly])
    period = int(rng.integers(3, 6))
    if texture == "speckle":
        on = rng.random((h, w)) < 0.5
    elif texture == "outline":
        border = Image.new("L", (w, h), 0)
        ImageDraw.Draw(border).polygon(poly, outline=255, width=max(2, period))
        on = np.asarray(border) > 127
    elif texture == "ramp":
        t = np.clip((xx - cx) / (2 * max(1.0, np.ptp([p[0] for p in poly]) / 2)) + 0.5, 0, 1)[..., None]
        fill = (1 - t) * first + t * other
        img.paste(Image.fromarray(fill.astype(np.uint8)), (0, 0), mask_img)
        return np.asarray(mask_img) > 127
    else:
        on = TEXTURES[texture](xx, yy, cx, cy, period)
    fill = np.where(on[..., None], first, other)
    img.paste(Image.fromarray(fill.astype(np.uint8)), (0, 0), mask_img)
    return np.asarray(mask_img) > 127


def classification_image(rng, cls, size):
    """One object of class `cls`, random nuisances, on a `size` x `size` canvas."""
    img, bg = background(rng, size, size)
    shape, texture = class_style(cls)
    radius = size * rng.uniform(0.28, 0.45)
    cx, cy = rng.uniform(radius, size - radius, size=2)
    poly = polygon(shape, cx, cy, radius, rng.uniform(0, 2 * math.pi))
    draw_object(img, poly, _random_colour(rng, avoid=bg), texture, rng)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    return img


def scene(rng, classes, width, height, min_frac=0.12, max_frac=0.3):
    """Non-overlapping objects of the given classes; returns (image, [dict(cls, polygon, mask, box)]).

    An object that finds no free place in 50 tries is left out. Boxes are tight around the mask,
    in pixels (x0, y0, x1, y1) with x1, y1 exclusive; the polygon is the object's exact outline.
    """
    img, bg = background(rng, width, height)
    occupied = np.zeros((height, width), bool)
    objects = []
    for cls in classes:
        shape, texture = class_style(cls)
        for _ in range(50):
            radius = min(width, height) * rng.uniform(min_frac, max_frac)
            cx = rng.uniform(radius, width - radius)
            cy = rng.uniform(radius, height - radius)
            poly = polygon(shape, cx, cy, radius, rng.uniform(0, 2 * math.pi))
            probe = Image.new("L", (width, height), 0)
            ImageDraw.Draw(probe).polygon(poly, fill=255, outline=255, width=3)
            if not (occupied & (np.asarray(probe) > 0)).any():
                break
        else:
            continue
        mask = draw_object(img, poly, _random_colour(rng, avoid=bg), texture, rng)
        occupied |= np.asarray(probe) > 0
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append({"cls": cls, "polygon": poly, "mask": mask, "box": box})
    return img, objects
