"""An offline sample-quality measure for the built-in demo dataset: no download, no Inception.

The demo images are rendered from known factors (:func:`triangle.datasets.demo_factors`), so a
small CNN can be trained on the renderer's own labels, and its penultimate layer serves as the
feature space of a Fréchet distance, like Inception's pool3 does for FID:

- :class:`DemoFeatureNet`: images of any size R x R (4 <= R <= 1024) in [-1, 1], resized to
  32 x 32, -> a ``FEATURE_DIM``-d feature vector plus heads for the object's shape (5 logits
  over ``CLASSES``: the 4 SHAPES and "none", no recognisable shape), colour (RGB) and position
  (cx, cy), and a few auxiliary factors that make the features see the background, scale,
  satellite and texture too.
- :func:`train_demo_features`: fixed-seed training on fresh renders of seed ``TRAIN_SEED``
  (never the demo dataset's default seed 0) at 8, 16, 32 and 64, each image rendered at 64 and
  box-filtered down as the LMDB levels are, and on negatives made the same way
  (:func:`negative_images`: the background alone, Gaussian-blurred renders, soft colour blobs,
  noise), labelled "none". ``tools/train_demo_features.py`` rebuilds the shipped weights
  ``demo_features.pt`` (package data beside this file).
- :class:`DemoReference`: held-out feature statistics and the two reference distances computed
  once, then :meth:`DemoReference.score` per batch of samples -> :class:`DemoQuality` (FD,
  fraction of samples that show one of the demo's shapes, floor and noise).
  :func:`demo_quality` is the one-shot form.
- :class:`DemoFeatures`: the same network as a :class:`triangle.metrics.fid.FeatureExtractor`,
  for ``data_statistics`` / ``fid_of_generator`` and ``tools/fid.py --features demo``.

The numbers are comparable with nothing published, only with each other (same weights, same
sample count: a Fréchet distance from N images is biased upwards by about 1/N, which is why the
floor is measured with as many images as the samples).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..datasets import (
    SHAPES,
    DatasetError,
    MultiResolutionDataset,
    box_downsample,
    demo_factors,
    render_demo_image,
    split_indices,
)
from ..datasets.demo import _hsv_to_rgb
from .fid import FeatureStats, FIDError, fid_from_stats

WEIGHTS_FILE = Path(__file__).with_name("demo_features.pt")
REBUILD_COMMAND = "python tools/train_demo_features.py"
INTERNAL_SIZE = 32  # every input is resized to this before the first convolution
SCORE_BATCH = 512  # images through the network at once (and noise or renders made at once)
# 64: small enough that the Fréchet distance (two 64 x 64 eigendecompositions) costs nothing
# beside the forward pass, and the training loop scores every tick.
FEATURE_DIM = 64
TRAIN_SEED = 12345  # demo seed of the training renders; the demo dataset defaults to seed 0
TRAIN_RESOLUTIONS = (8, 16, 32, 64)
# Their shares of each training batch: 16 x 16 (small objects a few pixels wide) is the hardest
# level that must be read confidently; 64 reaches the network as 32 x 32 box averages, nearly
# the 32 level's images again.
TRAIN_SHARES = (1.0, 3.0, 1.5, 0.5)
# Regression targets after the shape: the object's colour and position (the public heads),
# then auxiliary factors that only shape the features (mean background colour, size,
# satellite direction, stripe contrast).
COLOUR, POSITION, EXTRA = slice(0, 3), slice(3, 5), slice(5, 12)
NUM_TARGETS = 12
# The classifier's classes: the demo's shapes, then "none" (no recognisable shape: what the
# negatives are labelled). shape_logits index CLASSES; CLASSES[:NONE] == SHAPES.
CLASSES = (*SHAPES, "none")
NONE = len(SHAPES)
# Kinds of negative image (see negative_levels) and how often each is drawn.
NEGATIVE_KINDS = ("background", "blurred", "blobs", "noise", "smooth-noise")
NEGATIVE_WEIGHTS = (0.15, 0.35, 0.3, 0.1, 0.1)
BLUR_SIGMA = (0.06, 0.20)  # blurred negatives: Gaussian sigma as a fraction of the image side
NOISE_STD = 0.15  # training images with added Gaussian noise: its largest standard deviation


def demo_targets(index: int, seed: int) -> tuple[int, np.ndarray]:
    """Image ``(index, seed)``'s shape (index into SHAPES) and its ``NUM_TARGETS`` regression
    targets (float32, layout COLOUR, POSITION, EXTRA)."""
    f = demo_factors(index, seed)
    c0, c1 = f["background"]
    extra = [*(0.5 * (a + b) for a, b in zip(c0, c1)), f["size"],
             math.cos(f["satellite_angle"]), math.sin(f["satellite_angle"]), f["stripe_contrast"]]
    return f["shape"], np.array([*f["colour"], *f["position"], *extra], dtype=np.float32)


def demo_images(indices: Sequence[int], resolution: int, seed: int = 0, top: int = 64) -> Tensor:
    """Demo images ``indices`` of ``seed`` at ``resolution``: float N x 3 x R x R in [-1, 1].

    Rendered at ``max(top, resolution)`` and box-filtered down by 2 x 2 steps, as
    ``write_demo_lmdb(max_resolution=top)`` builds its levels (``resolution`` must be ``top``
    divided by a power of 2 when smaller), so they are byte-identical to the LMDB's raw levels.
    """
    top = max(int(top), int(resolution))
    out = []
    for i in indices:
        a = render_demo_image(int(i), top, seed)
        while a.shape[0] > resolution:
            a = box_downsample(a)
        if a.shape[0] != resolution:
            raise ValueError(f"resolution {resolution} is not {top} / 2^k")
        out.append(a)
    return _to_unit(torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2))


def _to_unit(images: Tensor) -> Tensor:
    """uint8 (or [0, 255]) images -> float in [-1, 1], as the LMDB reader returns them."""
    return images.float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# The network


class DemoOutputs(NamedTuple):
    features: Tensor  # B x FEATURE_DIM, the Fréchet distance's feature space
    shape_logits: Tensor  # B x 5, over CLASSES (the 4 SHAPES, then "none")
    colour: Tensor  # B x 3, object RGB in [0, 1] units
    position: Tensor  # B x 2, object centre (cx, cy) in image units ([-1, 1] across the image)
    extra: Tensor  # B x 7, auxiliary factors (see EXTRA)


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class DemoFeatureNet(nn.Module):
    """Images (B x 3 x R x R in [-1, 1], 4 <= R <= 1024) -> :class:`DemoOutputs`.

    Inputs are resized to 32 x 32 first: area averaging from above (a box filter, as the LMDB's
    levels are made), bilinear from below. Four 3 x 3 convolutions (32 -> 4 pixels) and a linear
    layer give the features (pre-activation, so none is constant and their covariance stays
    well conditioned); the heads read their ReLU. Uses BatchNorm: call ``eval()`` for
    deterministic outputs (everything here that scores does).
    """

    def __init__(self, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(3, 24, 1), _conv(24, 32, 2), _conv(32, 48, 2),
                                  _conv(48, 32, 2), nn.Flatten())
        self.fc = nn.Linear(32 * 4 * 4, feature_dim)
        self.shape_head = nn.Linear(feature_dim, len(CLASSES))
        self.regression_head = nn.Linear(feature_dim, NUM_TARGETS)
        # Regression targets are learnt standardised; these map them back to their units.
        self.register_buffer("target_mean", torch.zeros(NUM_TARGETS))
        self.register_buffer("target_std", torch.ones(NUM_TARGETS))

    @staticmethod
    def resize(images: Tensor) -> Tensor:
        """B x 3 x R x R -> B x 3 x 32 x 32 (float32)."""
        x = images.float()
        r = x.shape[-1]
        if r > INTERNAL_SIZE:
            return F.interpolate(x, size=(INTERNAL_SIZE, INTERNAL_SIZE), mode="area")
        if r < INTERNAL_SIZE:
            return F.interpolate(x, size=(INTERNAL_SIZE, INTERNAL_SIZE), mode="bilinear",
                                 align_corners=False)
        return x

    def from_resized(self, x: Tensor) -> DemoOutputs:
        """:meth:`forward` on inputs already resized to 32 x 32."""
        features = self.fc(self.body(x))
        h = F.relu(features)
        reg = self.regression_head(h) * self.target_std + self.target_mean
        return DemoOutputs(features, self.shape_head(h), reg[:, COLOUR], reg[:, POSITION],
                           reg[:, EXTRA])

    def forward(self, images: Tensor) -> DemoOutputs:
        return self.from_resized(self.resize(images))


def weights_digest(net: nn.Module) -> str:
    """First 12 hex digits of a SHA-256 of the state dict (names the weights in cache keys)."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def load_demo_features(path: str | os.PathLike | None = None,
                       device: str | torch.device = "cpu") -> DemoFeatureNet:
    """The trained network from ``path`` (default: the shipped ``demo_features.pt``), in eval
    mode, without gradients, on ``device``. Raises FIDError (one line) if the file is missing."""
    file = WEIGHTS_FILE if path is None else Path(path)
    if not file.is_file():
        out = "" if path is None else f" --out {file}"
        raise FIDError(f"demo feature weights not found: {file}; "
                       f"rebuild them with {REBUILD_COMMAND}{out}")
    with torch.random.fork_rng(devices=[]):  # its throw-away init must not move a run's RNG
        net = DemoFeatureNet()
    net.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    return net.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Negatives: images without a recognisable shape, the "none" class


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """N x C x H x W images blurred by a Gaussian of ``sigma`` pixels (float32; separable,
    truncated at 3 sigma and at the image size, mirrored borders). ``sigma <= 0``: unchanged."""
    x = images.float()
    if sigma <= 0:
        return x
    h, w = x.shape[-2:]
    radius = max(1, min(math.ceil(3 * sigma), h - 1, w - 1))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(x.device)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1),
                 groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"),
                    k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _uint8(image: np.ndarray | Tensor) -> np.ndarray:
    """Float H x W x 3 in [0, 1] -> uint8, rounded as the renderer rounds."""
    a = image.numpy() if isinstance(image, Tensor) else image
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _blobs(background: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 H x W x 3 ``background`` plus one or two soft Gaussian blobs of random colour, size,
    elongation and position (what an under-trained VAE-like generator draws); the second blob is
    half the time a smaller one of the complementary colour nearby, like a blurred satellite."""
    r = background.shape[0]
    c = (np.arange(r, dtype=np.float32) + 0.5) / r * 2.0 - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")
    img = background.astype(np.float32) / 255.0
    colour = _hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 1.0), rng.uniform(0.4, 1.0))
    centre = rng.uniform(-0.45, 0.45, size=2)
    scale = rng.uniform(0.12, 0.45)
    blobs = [(colour, centre, scale)]
    if rng.uniform() < 0.5:
        if rng.uniform() < 0.5:  # a blurred satellite
            a = rng.uniform(0, 2 * np.pi)
            d = scale * rng.uniform(1.0, 2.0)
            blobs.append((1.0 - colour, centre + d * np.array([np.cos(a), np.sin(a)]),
                          scale * rng.uniform(0.25, 0.5)))
        else:
            blobs.append((_hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 1.0), rng.uniform(0.4, 1.0)),
                          rng.uniform(-0.6, 0.6, size=2), rng.uniform(0.08, 0.35)))
    for colour, (cx, cy), scale in blobs:
        aspect, angle = np.exp(rng.uniform(-0.4, 0.4)), rng.uniform(0, np.pi)
        u = ((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)) / (scale * aspect)
        v = (-(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)) * aspect / scale
        alpha = (rng.uniform(0.6, 1.0) * np.exp(-0.5 * (u * u + v * v)))[..., None]
        img = img * (1.0 - alpha) + colour * alpha
    return _uint8(img)


def _levels(image: np.ndarray, resolutions: Sequence[int]) -> dict[int, np.ndarray]:
    """uint8 H x W x 3 -> {r: it box-filtered down to r x r} (each r = H / 2^k)."""
    out, a = {}, image
    while True:
        if a.shape[0] in resolutions:
            out[a.shape[0]] = a
        if a.shape[0] <= min(resolutions):
            break
        a = box_downsample(a)
    if out.keys() != set(resolutions):
        raise ValueError(f"resolutions {sorted(resolutions)} are not {image.shape[0]} / 2^k")
    return out


def negative_levels(index: int, seed: int, resolutions: Sequence[int], kind: str | None = None,
                    top: int = 64) -> tuple[str, dict[int, np.ndarray]]:
    """Negative image ``(index, seed)``: its kind and {r: uint8 r x r x 3} for ``resolutions``
    (each ``top`` / 2^k), made as positives are, rendered at ``top`` and box-filtered down.

    Kinds (``kind``: that one; None: drawn with NEGATIVE_WEIGHTS):

    - ``background``: demo scene ``(index, seed)`` without its object and satellite;
    - ``blurred``: demo image ``(index, seed)`` blurred by a Gaussian of sigma BLUR_SIGMA (6 to
      20%) of the side, the object a soft blob;
    - ``blobs``: that scene's background with one or two soft Gaussian blobs (:func:`_blobs`);
    - ``noise``: uniform noise made at r .. ``top`` (drawn per level) and filtered down to r;
    - ``smooth-noise``: uniform noise of 2 x 2 .. 4 x 4 upsampled bilinearly.

    Deterministic in (index, seed, kind, resolutions); its random numbers are a stream of their
    own, not demo image ``(index, seed)``'s.
    """
    rng = np.random.default_rng((int(seed), int(index), 0x6E6F6E65))  # "none"
    k = rng.choice(len(NEGATIVE_KINDS), p=NEGATIVE_WEIGHTS)
    kind = NEGATIVE_KINDS[k] if kind is None else kind
    if kind == "background":
        return kind, _levels(render_demo_image(index, top, seed, objects=False), resolutions)
    if kind == "blurred":
        x = torch.from_numpy(render_demo_image(index, top, seed)).permute(2, 0, 1)[None] / 255.0
        sigma = rng.uniform(*BLUR_SIGMA) * top
        return kind, _levels(_uint8(gaussian_blur(x, sigma)[0].permute(1, 2, 0)), resolutions)
    if kind == "blobs":
        return kind, _levels(_blobs(render_demo_image(index, top, seed, objects=False), rng),
                             resolutions)
    if kind == "noise":
        out = {}
        for r in resolutions:
            native = r * 2 ** int(rng.integers(0, int(math.log2(top // r)) + 1))
            out[r] = _levels(rng.integers(0, 256, size=(native, native, 3), dtype=np.uint8), [r])[r]
        return kind, out
    if kind == "smooth-noise":
        n = int(rng.integers(2, 5))
        grid = torch.from_numpy(rng.uniform(0, 1, size=(1, 3, n, n)).astype(np.float32))
        up = F.interpolate(grid, size=(top, top), mode="bilinear", align_corners=False)
        return kind, _levels(_uint8(up[0].permute(1, 2, 0)), resolutions)
    raise ValueError(f"unknown negative kind {kind!r}; expected one of {NEGATIVE_KINDS}")


def negative_images(indices: Iterable[int], resolution: int, seed: int = 0, kind: str | None = None,
                    top: int = 64) -> Tensor:
    """Negatives ``indices`` of ``seed`` (:func:`negative_levels`) at ``resolution``: float
    N x 3 x R x R in [-1, 1], like :func:`demo_images`."""
    out = [negative_levels(int(i), seed, [resolution], kind, top)[1][resolution] for i in indices]
    return _to_unit(torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------
# Training


def _training_set(count: int, seed: int, resolutions: Sequence[int]) -> tuple[dict, Tensor, Tensor]:
    """``count`` renders of ``seed`` as {resolution: uint8 N x 3 x R x R}, shapes, targets."""
    top = max(resolutions)
    levels: dict[int, list] = {r: [] for r in resolutions}
    shapes, targets = [], []
    for i in range(count):
        a = render_demo_image(i, top, seed)
        while True:
            if a.shape[0] in levels:
                levels[a.shape[0]].append(a)
            if a.shape[0] <= min(resolutions):
                break
            a = box_downsample(a)
        s, t = demo_targets(i, seed)
        shapes.append(s)
        targets.append(t)
    images = {r: torch.from_numpy(np.stack(v)).permute(0, 3, 1, 2).contiguous()
              for r, v in levels.items()}
    return images, torch.tensor(shapes), torch.from_numpy(np.stack(targets))


def _negative_set(count: int, seed: int, resolutions: Sequence[int]) -> dict[int, Tensor]:
    """Negatives ``0 .. count - 1`` of ``seed`` as {resolution: uint8 N x 3 x R x R}."""
    top = max(resolutions)
    levels: dict[int, list] = {r: [] for r in resolutions}
    for i in range(count):
        for r, a in negative_levels(i, seed, resolutions, top=top)[1].items():
            levels[r].append(a)
    return {r: torch.from_numpy(np.stack(v)).permute(0, 3, 1, 2).contiguous()
            for r, v in levels.items()}


def _mirror(x: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Mirror a batch of square images in all 8 ways of the square's symmetry group, an eighth
    each (first half: left-right; even rows: top-bottom; middle half: about the diagonal), and
    the targets with them: a left-right mirror negates cx and the satellite's cos, a top-bottom
    one cy and its sin, the diagonal swaps cx with cy and cos with sin. The shape classes are
    closed under all of them (random rotations of mirror-symmetric shapes)."""
    i = torch.arange(len(x))
    h, v = i < len(x) // 2, i % 2 == 0
    d = (i >= len(x) // 4) & (i < len(x) // 4 + len(x) // 2)
    x = torch.where(h.view(-1, 1, 1, 1), x.flip(-1), x)
    x = torch.where(v.view(-1, 1, 1, 1), x.flip(-2), x)
    x = torch.where(d.view(-1, 1, 1, 1), x.transpose(-1, -2), x)
    if targets is None:
        return x, None
    t = targets.clone()
    p, c = POSITION.start, EXTRA.start + 4  # (cx, cy) and (cos, sin) of the satellite's angle
    t[h, p] *= -1
    t[h, c] *= -1
    t[v, p + 1] *= -1
    t[v, c + 1] *= -1
    for a in (p, c):
        t[d, a], t[d, a + 1] = t[d, a + 1].clone(), t[d, a].clone()
    return x, t


def _add_noise(x: Tensor, gen: torch.Generator, max_std: float = NOISE_STD) -> Tensor:
    """Every fourth image of ``x`` (in [-1, 1]) plus Gaussian noise of a standard deviation drawn
    uniformly in [0, ``max_std``], clamped: the classifier learns that a noisy shape is still a
    shape (and a noisy blob still none) instead of reading noise itself as "none"."""
    x = x.clone()
    sub = x[1::4]
    std = torch.rand(len(sub), 1, 1, 1, generator=gen) * max_std
    x[1::4] = (sub + std * torch.randn(sub.shape, generator=gen)).clamp(-1.0, 1.0)
    return x


def _split(total: int, shares: Sequence[float]) -> np.ndarray:
    """Offsets 0 = o[0] <= ... <= o[-1] = total that cut ``total`` in the proportions ``shares``."""
    cum = np.cumsum([0.0, *shares])
    return np.round(total * cum / cum[-1]).astype(int)


def train_demo_features(
    seed: int = 0,
    *,
    count: int = 20_000,
    negatives: int = 8000,
    steps: int = 6000,
    batch: int = 64,
    negative_batch: int = 16,
    shape_weight: float = 1.0,
    lr: float = 3e-3,
    data_seed: int = TRAIN_SEED,
    resolutions: Sequence[int] = TRAIN_RESOLUTIONS,
    shares: Sequence[float] | None = TRAIN_SHARES,
    log: Callable[[str], None] | None = None,
) -> DemoFeatureNet:
    """A :class:`DemoFeatureNet` trained from ``seed`` on ``count`` renders of ``data_seed``
    and ``negatives`` negative images of it (:func:`negative_levels`, class "none").

    Every batch holds ``batch`` renders and ``negative_batch`` negatives, all ``resolutions``
    in the proportions ``shares`` (None: equal; images made at the largest and box-filtered
    down, as in the LMDB), each mirrored one of the 8 ways of :func:`_mirror`, a quarter of them
    with Gaussian noise added (:func:`_add_noise`); loss =
    ``shape_weight`` x cross-entropy over CLASSES (shapes and "none") + mean squared error of
    the renders' standardised targets (negatives have none). Adam with a one-cycle learning
    rate over ``steps``. Deterministic on the CPU for a given thread count. Returns it in eval
    mode.
    """
    if shares is not None and len(shares) != len(resolutions):
        raise ValueError(f"{len(shares)} shares for {len(resolutions)} resolutions")
    t0 = time.perf_counter()
    images, shapes, targets = _training_set(count, data_seed, resolutions)
    negative = _negative_set(negatives, data_seed, resolutions) if negatives else None
    if log:
        log(f"rendered {count} images and {negatives} negatives of demo seed {data_seed} "
            f"in {time.perf_counter() - t0:.1f} s")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DemoFeatureNet()
    net.target_mean.copy_(targets.mean(0))
    net.target_std.copy_(targets.std(0))
    net = net.to(memory_format=torch.channels_last)  # a third faster on the CPU
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    per = _split(batch, shares or [1.0] * len(resolutions))
    neg_per = _split(negative_batch if negative is not None else 0, shares or [1.0] * len(resolutions))
    net.train()
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(count, size=int(per[-1])))
        nidx = torch.from_numpy(rng.integers(max(negatives, 1), size=int(neg_per[-1])))
        parts, tgt, negative_parts = [], [], []
        for k, r in enumerate(resolutions):
            j = idx[per[k]:per[k + 1]]
            x, t = _mirror(_to_unit(images[r][j]), targets[j])
            parts.append(DemoFeatureNet.resize(_add_noise(x, gen)))
            tgt.append(t)
            if neg_per[k + 1] > neg_per[k]:
                x, _ = _mirror(_to_unit(negative[r][nidx[neg_per[k]:neg_per[k + 1]]]))
                negative_parts.append(DemoFeatureNet.resize(_add_noise(x, gen)))
        out = net.from_resized(torch.cat(parts + negative_parts)
                               .contiguous(memory_format=torch.channels_last))
        t = torch.cat(tgt)
        n = len(t)  # the renders come first; only they have regression targets
        labels = torch.cat([shapes[idx], torch.full((len(nidx),), NONE, dtype=shapes.dtype)])
        reg = torch.cat([out.colour[:n], out.position[:n], out.extra[:n]], 1)
        loss_shape = F.cross_entropy(out.shape_logits, labels)
        loss_reg = ((reg - t) / net.target_std).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        (shape_weight * loss_shape + loss_reg).backward()
        opt.step()
        sched.step()
        if log and (step + 1) % max(1, steps // 10) == 0:
            log(f"step {step + 1}/{steps}: shape CE {loss_shape.item():.4f}, "
                f"regression MSE {loss_reg.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    return net.to(memory_format=torch.contiguous_format).eval().requires_grad_(False)


@torch.no_grad()
def recognised_fraction(net: DemoFeatureNet, images: Tensor, confidence: float = 0.9) -> float:
    """Fraction of ``images`` (N x 3 x R x R in [-1, 1]) that show one of the demo's shapes:
    argmax over CLASSES is a shape, not "none", with probability >= ``confidence``
    (:attr:`DemoQuality.shapes_recognised`'s measure)."""
    return _recognised(demo_outputs(net.eval(), images)[1], confidence)


def _recognised(probs: Tensor, confidence: float) -> float:
    """Fraction of rows of ``probs`` (N x CLASSES) whose argmax is a shape (not "none") of
    probability >= ``confidence``."""
    p, c = probs.max(1)
    return float(((c < NONE) & (p >= confidence)).double().mean())


@torch.no_grad()
def shape_accuracy(net: DemoFeatureNet, resolution: int, count: int = 1000, *, seed: int = 0,
                   first: int = 0, top: int = 64,
                   transform: Callable[[Tensor], Tensor] | None = None) -> float:
    """Fraction of demo images ``first .. first + count - 1`` of ``seed`` (default: the demo
    dataset's own images, never trained on) whose shape ``net`` classifies right (argmax over
    CLASSES: "none" counts as wrong). ``transform`` maps each batch of images (B x 3 x R x R in
    [-1, 1]) before it is classified, e.g. to a model's reconstructions of them."""
    indices = range(first, first + count)
    x = demo_images(indices, resolution, seed, top)
    if transform is not None:
        x = torch.cat([transform(b).cpu() for b in x.split(256)])
    return shapes_kept(net, x, indices, seed)


def shapes_kept(net: DemoFeatureNet, images: Tensor, indices: Sequence[int], seed: int = 0) -> float:
    """Fraction of ``images`` (N x 3 x R x R in [-1, 1]: demo images ``indices`` of ``seed``, or
    images made from them, such as their reconstructions) whose shape ``net`` classifies as the
    rendered one (argmax over CLASSES: "none" counts as wrong)."""
    truth = torch.tensor([demo_factors(int(i), seed)["shape"] for i in indices])
    if len(truth) != len(images):
        raise ValueError(f"{len(images)} images for {len(truth)} demo indices")
    return float((demo_outputs(net.eval(), images)[1].argmax(1) == truth).float().mean())


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class DemoQuality:
    """One batch of samples scored against a :class:`DemoReference`."""

    fd: float  # Fréchet distance of the samples' features to the held-out images' features
    # Fraction of samples that show one of the demo's shapes: the classifier's argmax over
    # CLASSES is a shape (not "none") and its softmax probability is >= the confidence (0.9).
    shapes_recognised: float
    # Fraction of samples whose argmax is each of SHAPES; with none_fraction, they sum to 1.
    shape_fractions: tuple[float, ...]
    none_fraction: float  # fraction of samples whose argmax is "none" (no recognisable shape)
    count: int  # samples scored
    # FD of real images not in the held-out statistics (training images, fresh renders) to them;
    # None: none given.
    floor: float | None
    noise: float  # FD of uniform noise images to the same statistics
    # shapes_recognised of real images (the training images, else the held-out ones): the ceiling
    # a perfect generator reaches; None when the reference was given as statistics only.
    data_recognised: float | None = None

    def summary(self) -> str:
        floor = "n/a" if self.floor is None else f"{self.floor:.3f}"
        data = ("" if self.data_recognised is None
                else f" ({100 * self.data_recognised:.1f}% of real images)")
        return (f"demo FD {self.fd:.3f} (floor {floor}, noise {self.noise:.3f}); "
                f"shapes recognised in {100 * self.shapes_recognised:.1f}% of samples{data}, "
                f"no shape in {100 * self.none_fraction:.1f}%")


@torch.no_grad()
def demo_outputs(net: DemoFeatureNet, images: Tensor | Iterable[Tensor],
                 batch: int = SCORE_BATCH) -> tuple[np.ndarray, Tensor]:
    """``images`` (N x 3 x R x R in [-1, 1], any device; or an iterable of such batches, so
    that a generator's samples need not all be in memory at once) -> (features N x D float32
    numpy, class probabilities N x 5 over CLASSES on the CPU), computed on ``net``'s device."""
    device = next(net.parameters()).device
    feats, probs = [], []
    for b in images.split(batch) if isinstance(images, Tensor) else images:
        out = net(b.to(device, torch.float32))
        feats.append(out.features.float().cpu())
        probs.append(out.shape_logits.float().softmax(1).cpu())
    return torch.cat(feats).numpy(), torch.cat(probs)


class DemoReference:
    """Held-out statistics and the floor / noise distances, computed once; :meth:`score` then
    rates any number of sample batches cheaply (one forward pass and a 64-d Fréchet distance each).

    ``reference``: held-out images (N x 3 x R x R in [-1, 1]; several hundred, more than
    FEATURE_DIM, keep the covariance well conditioned) or their precomputed FeatureStats.
    ``training``: training images (M x 3 x R x R in [-1, 1], or an iterable of such batches with
    ``resolution`` given), for ``floor`` = FD(training vs held-out): the distance of a perfect
    generator, pure sampling noise; use as many as the samples you will score. ``noise`` = FD
    of as many (``noise_count``, default the training images' or the reference's count)
    uniform noise images in [-1, 1] (seeded by ``seed``) to the held-out statistics. ``net``: default the shipped weights (:func:`load_demo_features`);
    images may live on any device, they are moved to ``net``'s. ``resolution`` is needed only
    when neither image tensor is given. ``confidence``: the probability the classifier must
    give a shape (its argmax, not "none") for a sample to count in ``shapes_recognised``.
    """

    def __init__(
        self,
        reference: Tensor | FeatureStats,
        training: Tensor | None = None,
        net: DemoFeatureNet | None = None,
        *,
        confidence: float = 0.9,
        noise_count: int | None = None,
        resolution: int | None = None,
        seed: int = 0,
    ) -> None:
        self.net = (load_demo_features() if net is None else net).eval()
        self.confidence = confidence
        self.floor = self.data_recognised = None
        if isinstance(reference, FeatureStats):
            self.stats = reference
        else:
            features, probs = demo_outputs(self.net, reference)
            self.stats = FeatureStats.of(features)
            self.data_recognised = self._recognised(probs)
            resolution = reference.shape[-1]
        if training is not None:
            features, probs = demo_outputs(self.net, training)
            self.floor = fid_from_stats(FeatureStats.of(features), self.stats)
            self.data_recognised = self._recognised(probs)
            resolution = training.shape[-1] if isinstance(training, Tensor) else resolution
        if resolution is None:
            raise ValueError("DemoReference: give reference or floor images, or the resolution")
        n = noise_count or (len(probs) if training is not None else self.stats.count)
        gen = torch.Generator().manual_seed(seed)
        # Drawn a batch at a time (10,000 noise images of 256x256 would be 8 GB at once): the
        # same generator in sequence gives the same values as one draw.
        self.noise = self.distance(
            torch.rand(min(SCORE_BATCH, n - i), 3, resolution, resolution, generator=gen) * 2 - 1
            for i in range(0, n, SCORE_BATCH))

    def _recognised(self, probs: Tensor) -> float:
        return _recognised(probs, self.confidence)

    def distance(self, images: Tensor | Iterable[Tensor]) -> float:
        """FD of ``images`` (N >= 2, in [-1, 1]; or an iterable of such batches) to the held-out
        statistics."""
        return fid_from_stats(FeatureStats.of(demo_outputs(self.net, images)[0]), self.stats)

    def score(self, samples: Tensor | Iterable[Tensor]) -> DemoQuality:
        """Rate ``samples``: N >= 2 x 3 x R x R in [-1, 1] (a generator's output; any device),
        or an iterable of such batches."""
        features, probs = demo_outputs(self.net, samples)
        fractions = torch.bincount(probs.argmax(1), minlength=len(CLASSES)).double() / len(probs)
        return DemoQuality(
            fd=fid_from_stats(FeatureStats.of(features), self.stats),
            shapes_recognised=self._recognised(probs),
            shape_fractions=tuple(float(f) for f in fractions[:NONE]),
            none_fraction=float(fractions[NONE]),
            count=len(probs), floor=self.floor, noise=self.noise,
            data_recognised=self.data_recognised)

    @classmethod
    def for_demo(cls, resolution: int, net: DemoFeatureNet | None = None, *, count: int = 512,
                 data_count: int = 2000, seed: int = 0, top: int = 64,
                 confidence: float = 0.9) -> DemoReference:
        """For a demo dataset of ``data_count`` images of ``seed`` (``write_demo_lmdb``'s count
        and seed; ``top`` its max resolution, capped at 64): held-out = ``count`` fresh renders
        of indices ``data_count ..`` (never in the dataset, so never trained on), floor images =
        its first ``count`` images (essentially its training split), both made as the LMDB's
        raw levels are. Scores are then comparable for ``count`` samples."""
        top = min(top, 64)  # higher levels are JPEG in the LMDB; a 64 render is close enough
        held_out = demo_images(range(data_count, data_count + count), resolution, seed, top)
        training = demo_images(range(count), resolution, seed, top)
        return cls(held_out, training, net, confidence=confidence)

    @classmethod
    def from_lmdb(cls, data: str | os.PathLike, resolution: int, net: DemoFeatureNet | None = None,
                  *, count: int = 512, confidence: float = 0.9) -> DemoReference:
        """Held-out = the LMDB's test split (its first ``count`` images), floor images = the
        first ``count`` of its train split. Raises DatasetError without a test split."""
        ds = MultiResolutionDataset(data, split="all")
        held = split_indices(ds.meta, "test")[:count]
        train = split_indices(ds.meta, "train")[:count]
        if len(held) < 2 or len(train) < 2:
            raise DatasetError(f"{data}: too few images for a demo reference "
                               f"({len(held)} test, {len(train)} train)")

        def images(indices) -> Tensor:
            return torch.stack([ds.image(int(i), resolution, as_float=True) for i in indices])

        return cls(images(held), images(train), net, confidence=confidence)


class DemoRunScorer:
    """The per-tick sample-quality score of a demo training run: ``progressive/train.py`` passes
    ``functools.partial(DemoRunScorer, data_count=..., seed=..., top=...)`` to ``training_loop``,
    which calls it with the device when the run starts (``progressive/reporter.py``'s
    ``ScorerFactory``). :meth:`score` rates EMA samples at any resolution against a
    :meth:`DemoReference.for_demo` reference built at the first score at that resolution, with
    as many images as the samples scored."""

    def __init__(self, device: str | torch.device = "cpu", *, data_count: int = 2000,
                 seed: int = 0, top: int = 64) -> None:
        self.net = load_demo_features(device=device)  # FIDError (one line) if missing
        self.data_count, self.seed, self.top = data_count, seed, top
        self.references: dict[int, DemoReference] = {}  # per resolution

    def score(self, samples: Tensor) -> DemoQuality:
        """Rate ``samples`` (N x 3 x R x R in [-1, 1], N >= 2)."""
        r = samples.shape[-1]
        if r not in self.references:
            self.references[r] = DemoReference.for_demo(
                r, self.net, count=len(samples), data_count=self.data_count, seed=self.seed,
                top=self.top)
        return self.references[r].score(samples)


def demo_quality(samples: Tensor, reference: Tensor, net: DemoFeatureNet | None = None,
                 floor_images: Tensor | None = None, confidence: float = 0.9) -> DemoQuality:
    """One-shot :meth:`DemoReference.score` (recomputes the reference; to score many batches,
    build a :class:`DemoReference` once). All images N x 3 x R x R in [-1, 1]; the noise
    reference uses as many images as ``samples``."""
    ref = DemoReference(reference, floor_images, net, confidence=confidence,
                        noise_count=len(samples))
    return ref.score(samples)


# ---------------------------------------------------------------------------------------------
# As a FID feature extractor


class DemoFeatures:
    """:class:`DemoFeatureNet`'s features as a ``FeatureExtractor`` (metrics/fid.py): ``prepare``
    maps one float 3 x R x R image in [0, 255] to [-1, 1]; ``__call__`` -> B x FEATURE_DIM;
    ``logits`` -> its shape head's."""

    def __init__(self, net: DemoFeatureNet | None = None, *, path: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.net = (load_demo_features(path) if net is None else net).to(self.device).eval()
        # The weights' digest keys the statistics cache: retrained weights never read old stats.
        self.name = f"demo-features-{weights_digest(self.net)}"

    @staticmethod
    def prepare(image: Tensor) -> Tensor:
        return _to_unit(image)

    @torch.no_grad()
    def __call__(self, batch: Tensor) -> Tensor:
        return self.net(batch.to(self.device, torch.float32)).features

    @torch.no_grad()
    def logits(self, features: Tensor) -> Tensor:
        """B x FEATURE_DIM features -> B x 5 shape logits over CLASSES (the Inception Score's
        classifier on the demo: at most 5)."""
        return self.net.shape_head(F.relu(features.to(self.device, torch.float32)))
