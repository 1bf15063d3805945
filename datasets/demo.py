"""The built-in demo dataset: procedural images rendered at any resolution, no download.

Each image is a scene with several independent modes of variation, all drawn from
``numpy.random.default_rng((seed, index))`` so an image depends only on (index, seed):

- background: a two-colour gradient at a random angle;
- object class: disc, square, triangle or ring (signed-distance shapes);
- pose: position, scale and rotation of the object;
- appearance: object colour and a stripe texture (frequency, orientation, contrast);
- a small satellite disc at a random angle around the object.

Shapes are rendered analytically with a one-pixel soft edge, so the same image rendered at
128 and at 1024 agrees up to detail; what is written to an LMDB is the top level rendered
once and box-filtered down like any other source.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

SHAPES = ("disc", "square", "triangle", "ring")


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (each in [0, 1]) -> float RGB in [0, 1], shape (3,)."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return (v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)).astype(np.float32)


def _signed_distance(kind: str, u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    """Signed distance (negative inside) of a shape centred at the origin, in image units."""
    if kind == "disc":
        return np.hypot(u, v) - size
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) - size * 0.8
    if kind == "ring":
        return np.abs(np.hypot(u, v) - size * 0.75) - size * 0.25
    # Equilateral triangle pointing up: the largest of three half-plane distances.
    d = size * 0.5
    n = ((0.0, 1.0), (0.866, -0.5), (-0.866, -0.5))
    return np.maximum(np.maximum(u * n[0][0] + v * n[0][1], u * n[1][0] + v * n[1][1]),
                      u * n[2][0] + v * n[2][1]) - d


class _Factors(NamedTuple):
    """One image's factors exactly as drawn (numpy scalar types kept: the renderer's arithmetic,
    and so its bytes, depend on them)."""

    background_angle: float
    background: tuple[np.ndarray, np.ndarray]  # two float32 RGB colours in [0, 1], shape (3,)
    shape: int  # index into SHAPES
    position: tuple[float, float]  # object centre (cx, cy), each in [-0.25, 0.25]
    size: float
    rotation: float
    colour: np.ndarray  # float32 RGB in [0, 1], shape (3,)
    stripe_frequency: float
    stripe_angle: float
    stripe_contrast: float
    satellite_angle: float
    satellite_radius: float


def _draw_factors(index: int, seed: int) -> _Factors:
    """Every random number of image ``(index, seed)``, in the one order the renderer relies on."""
    rng = np.random.default_rng((int(seed), int(index)))
    angle = rng.uniform(0, 2 * np.pi)
    c0 = _hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 0.6), rng.uniform(0.3, 0.9))
    c1 = _hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 0.6), rng.uniform(0.3, 0.9))
    shape = int(rng.integers(len(SHAPES)))
    cx, cy = rng.uniform(-0.25, 0.25, size=2)
    size = rng.uniform(0.3, 0.55)
    rot = rng.uniform(0, 2 * np.pi)
    colour = _hsv_to_rgb(rng.uniform(), rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0))
    freq = rng.uniform(3.0, 12.0)
    stripe_angle = rng.uniform(0, np.pi)
    contrast = rng.uniform(0.0, 0.35)
    sat_angle = rng.uniform(0, 2 * np.pi)
    sat_r = size * rng.uniform(0.2, 0.35)
    return _Factors(angle, (c0, c1), shape, (cx, cy), size, rot, colour, freq, stripe_angle,
                    contrast, sat_angle, sat_r)


def demo_factors(index: int, seed: int = 0) -> dict:
    """The factors of demo image ``(index, seed)``, as plain Python numbers.

    Image coordinates are [-1, 1] on both axes, y growing downwards (rows), so the object's
    centre ``position`` = (cx, cy) is at pixel ``((cx + 1) / 2 * R, (cy + 1) / 2 * R)`` of an
    R x R render. Keys:

    - ``shape``: int index into :data:`SHAPES`; ``position``: (cx, cy), each in [-0.25, 0.25];
      ``size``: radius-like scale in [0.3, 0.55]; ``rotation``: radians in [0, 2 pi);
    - ``colour``: the object's RGB (3 floats in [0, 1]), darkened inside by the stripes by up
      to ``stripe_contrast`` (in [0, 0.35]); ``stripe_frequency``, ``stripe_angle``;
    - ``background``: two RGB colours (each 3 floats in [0, 1]) of the gradient, at
      ``background_angle`` radians;
    - ``satellite_angle`` (radians) and ``satellite_radius`` of the small disc, whose colour is
      ``1 - colour``, centred ``1.35 * size`` from the object's centre.
    """
    f = _draw_factors(index, seed)

    def rgb(c: np.ndarray) -> tuple[float, float, float]:
        return tuple(float(v) for v in c)

    return {
        "shape": f.shape,
        "colour": rgb(f.colour),
        "position": (float(f.position[0]), float(f.position[1])),
        "size": float(f.size),
        "rotation": float(f.rotation),
        "background": (rgb(f.background[0]), rgb(f.background[1])),
        "background_angle": float(f.background_angle),
        "stripe_frequency": float(f.stripe_frequency),
        "stripe_angle": float(f.stripe_angle),
        "stripe_contrast": float(f.stripe_contrast),
        "satellite_angle": float(f.satellite_angle),
        "satellite_radius": float(f.satellite_radius),
    }


def render_demo_image(index: int, resolution: int, seed: int = 0, *,
                      objects: bool = True) -> np.ndarray:
    """Render demo image ``index``: ``uint8`` array of shape (resolution, resolution, 3).

    Deterministic in (index, seed); any resolution >= 1. Its factors: :func:`demo_factors`.
    ``objects=False``: the same scene's background gradient alone, without the object and the
    satellite (negatives for the demo feature network's "none" class).
    """
    f = _draw_factors(index, seed)
    r = int(resolution)
    # Pixel centres in [-1, 1]; y grows downwards like image rows.
    c = (np.arange(r, dtype=np.float32) + 0.5) / r * 2.0 - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")
    px = 2.0 / r  # one pixel in image units: width of the anti-aliased edge

    angle, (c0, c1) = f.background_angle, f.background
    t = np.clip((x * np.cos(angle) + y * np.sin(angle)) * 0.5 + 0.5, 0.0, 1.0)[..., None]
    img = c0 * (1.0 - t) + c1 * t
    if not objects:
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    (cx, cy), size = f.position, f.size
    cos, sin = np.cos(f.rotation), np.sin(f.rotation)
    u = (x - cx) * cos + (y - cy) * sin
    v = -(x - cx) * sin + (y - cy) * cos
    inside = np.clip(0.5 - _signed_distance(SHAPES[f.shape], u, v, size) / px, 0.0, 1.0)[..., None]

    colour, freq, stripe_angle = f.colour, f.stripe_frequency, f.stripe_angle
    stripes = np.sin((u * np.cos(stripe_angle) + v * np.sin(stripe_angle)) * freq * np.pi)
    texture = colour * (1.0 - f.stripe_contrast * (0.5 + 0.5 * stripes))[..., None]
    img = img * (1.0 - inside) + texture * inside

    sx = cx + np.cos(f.satellite_angle) * size * 1.35
    sy = cy + np.sin(f.satellite_angle) * size * 1.35
    sat = np.clip(0.5 - (np.hypot(x - sx, y - sy) - f.satellite_radius) / px, 0.0, 1.0)[..., None]
    img = img * (1.0 - sat) + (1.0 - colour) * sat
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
