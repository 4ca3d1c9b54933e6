"""Synthetic images of coloured shapes on varied backgrounds, for the demo model and its tests."""

import math
import random

from PIL import Image, ImageDraw, ImageFilter

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
LABELS = [f"{color} {shape}" for color in COLORS for shape in SHAPES]  # "red circle", ...

CAPTION_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
    "a {}.",
    "a {} on a plain background.",
    "an image of a {}.",
    "a small {}.",
    "a big {}.",
)


def draw(label: str, rng: random.Random, size: int = 128) -> Image.Image:
    """An RGB image of `label` ("red circle") at a random place, size and angle on a random muted background."""
    color_name, shape = label.split()
    base = rng.randint(50, 210)
    background = tuple(max(0, min(255, base + rng.randint(-25, 25))) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(image)
    for _ in range(rng.randint(0, 3)):  # faint clutter so the background is not a constant
        x0, y0 = rng.uniform(0, size), rng.uniform(0, size)
        shade = tuple(max(0, min(255, c + rng.randint(-30, 30))) for c in background)
        d.line([(x0, y0), (rng.uniform(0, size), rng.uniform(0, size))], fill=shade, width=rng.randint(1, 4))
    color = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLORS[color_name])
    r = rng.uniform(0.22, 0.34) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    # squares stand on a side and triangles point up, give or take 15 degrees: what tells the shapes apart stays
    # where a tiny model can learn it in minutes
    angle = math.radians(rng.uniform(-15, 15) + (45 if shape == "square" else -90))
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        corners = 4 if shape == "square" else 3
        radius = r * (1.25 if shape == "square" else 1.3)
        points = [(cx + radius * math.cos(angle + 2 * math.pi * i / corners), cy + radius * math.sin(angle + 2 * math.pi * i / corners)) for i in range(corners)]
        d.polygon(points, fill=color)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return image
