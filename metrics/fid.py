"""FID and KID through clean-fid, with reference statistics kept next to the data.

See docs/design.md, "Evaluation".

The pipeline, in clean-fid's "clean" mode:

1. Images as ``uint8``-valued floats in [0, 255], N x 3 x R x R. Data images are stored as
   ``uint8``; generated images are clamped from [-1, 1] and rounded to the same 256 levels,
   so both sides are quantised alike (clean-fid's advice).
2. ``extractor.prepare`` per image on the CPU (clean-fid's PIL bicubic resize to 299x299 on
   float values), in ``num_workers`` DataLoader workers for the data and as many threads for
   the generated images.
3. ``extractor(batch)`` on the device -> B x D features (Inception pool3, D = 2048).
4. ``mu``, ``sigma`` per side; FID = the Fréchet distance of the two Gaussians
   (:func:`fid_from_stats`, by symmetric eigendecompositions); KID = clean-fid's
   ``kernel_distance`` with a fixed seed; IS (:func:`inception_score`) from the classifier
   logits of the samples' features (Inception's 1008-way output layer without its bias, as
   stylegan2-ada computes it), 10 splits.

Under ``accelerate launch`` (or any initialised ``torch.distributed`` group) the batches are
shared out: rank ``r`` of ``W`` computes batches ``r, r + W, ...`` and the features are gathered
back into batch order on every rank (:class:`Shard`). The ``z`` of every batch is still drawn
from one stream, so the samples, and the numbers, are the single process's.

clean-fid's own entry points are not used: they wrap the model in ``DataParallel``, download
the weights into ``/tmp`` and write custom statistics into site-packages. Here the Inception
file comes from ``InceptionFeatures(path)`` (``InceptionV3W(dir, download=False)``), the
device is explicit, and the data statistics are cached as an ``.npz`` (mu, sigma, features)
named by a hash of what produced them (:func:`stats_key`).

The extractor is pluggable: anything with ``name``, ``prepare`` and ``__call__`` (see
:class:`FeatureExtractor`). :class:`RandomConvFeatures` is a small deterministic network that
stands in for Inception where its weights cannot be downloaded (tests, smoke runs). Its
numbers are comparable with nothing published.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..datasets import DatasetError, MultiResolutionDataset
from ..files import write_atomic

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
)
# Where clean-fid itself downloads the file (its features.py: "/tmp", "./" on Windows).
DEFAULT_INCEPTION_DIR = Path("./" if os.name == "nt" else "/tmp")
STATS_VERSION = 1  # bump when the way statistics are computed changes (invalidates the cache)


class FIDError(Exception):
    """A one-line problem with the FID inputs (missing weights, too few images, ...)."""


class FeatureExtractor(Protocol):
    """What the FID pipeline needs from a feature network."""

    name: str  # identifies the extractor (and its preprocessing) in the statistics cache key

    def prepare(self, image: Tensor) -> Tensor:
        """One image, float 3 x R x R in [0, 255] -> the network's input (CPU, picklable)."""

    def __call__(self, batch: Tensor) -> Tensor:
        """A batch of prepared images (on any device) -> B x D features."""

    # Optional, for the Inception Score: ``logits(features)``, B x D features -> B x K
    # classifier logits (extractors without a classifier do not define it).


# ---------------------------------------------------------------------------------------------
# Extractors


class CleanResize:
    """clean-fid's "clean" resize: PIL bicubic on float values to ``size`` x ``size``, clipped."""

    def __init__(self, size: int = 299) -> None:
        self.size = size
        self._fn: Callable | None = None

    def __getstate__(self) -> dict:
        return {"size": self.size, "_fn": None}  # clean-fid's resizer is a closure

    def __call__(self, image: Tensor) -> Tensor:
        if self._fn is None:
            from cleanfid.resize import make_resizer

            self._fn = make_resizer("PIL", False, "bicubic", (self.size, self.size))
        out = self._fn(image.permute(1, 2, 0).numpy().astype(np.float32))
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def inception_file(path: str | os.PathLike | None) -> Path:
    """The Inception TorchScript file for ``path`` (the file, or a folder holding it)."""
    p = DEFAULT_INCEPTION_DIR if path is None else Path(path)
    return p / INCEPTION_FILE if p.is_dir() or path is None else p


def _missing_inception(file: Path, why: str) -> FIDError:
    return FIDError(
        f"Inception weights {why}: {file}. Download {INCEPTION_FILE} from {INCEPTION_URL} "
        f"(on a machine with internet) and pass --inception PATH (the file or its folder)"
    )


def _download_inception(file: Path) -> None:
    """clean-fid's download, but into a temporary name renamed when complete."""
    file.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(INCEPTION_URL, timeout=30) as response:
            write_atomic(file, lambda fh: shutil.copyfileobj(response, fh))
    except OSError as exc:
        raise _missing_inception(file, f"not found and not downloadable ({exc})") from exc


class InceptionFeatures:
    """clean-fid's Inception-v3 (pool3, 2048 features) from a local TorchScript file.

    ``path``: the file ``inception-2015-12-05.pt`` or the folder holding it; ``None``:
    clean-fid's default folder (``/tmp``), downloading the file there if it is missing (as
    clean-fid does, but atomically). A given ``path`` is never downloaded to.
    """

    name = "clean-fid/inception-2015-12-05/clean-299"

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        from cleanfid.inception_torchscript import InceptionV3W

        file = inception_file(path)
        if not file.is_file():
            if path is not None:
                raise _missing_inception(file, "not found")
            _download_inception(file)
        if file.name != INCEPTION_FILE:  # InceptionV3W joins this name onto a folder
            raise FIDError(f"{file}: the Inception file must be named {INCEPTION_FILE}")
        try:
            with warnings.catch_warnings():  # torch 2.14 deprecates torch.jit.load, which it calls
                warnings.simplefilter("ignore", FutureWarning)
                model = InceptionV3W(str(file.parent), download=False, resize_inside=False)
        except Exception as exc:  # a truncated download, another file under that name
            raise _missing_inception(file, f"unreadable ({type(exc).__name__})") from exc
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.prepare = CleanResize(299)

    @torch.no_grad()
    def __call__(self, batch: Tensor) -> Tensor:
        return self.model(batch.to(self.device, torch.float32))

    @torch.no_grad()
    def logits(self, features: Tensor) -> Tensor:
        """B x 2048 pool3 features -> B x 1008 logits of the file's output layer, without its
        bias (stylegan2-ada's ``no_output_bias=True``, to match the original TensorFlow IS)."""
        weight = self.model.base.output.weight
        return features.to(weight.device, torch.float32) @ weight.T


class RandomConvFeatures(nn.Module):
    """A stand-in for Inception: a fixed random conv net (seeded), mean-pooled to ``dim`` features.

    Deterministic and tiny, for tests and smoke runs where Inception's weights cannot be
    downloaded. Its distances rank distributions sensibly but are comparable with nothing
    published; results carry its ``name``.
    """

    def __init__(self, dim: int = 64, seed: int = 0, device: str | torch.device = "cpu"):
        super().__init__()
        self.name = f"random-conv-{dim}-seed{seed}"
        gen = torch.Generator().manual_seed(seed)
        widths = [3, 16, 32, dim]
        self.convs = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            conv = nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2 / (cin * 9)))
                conv.bias.copy_(torch.randn(cout, generator=gen) * 0.1)
            self.convs.append(conv)
        self.device = torch.device(device)
        self.to(self.device).eval().requires_grad_(False)

    @staticmethod
    def prepare(image: Tensor) -> Tensor:
        return image

    @torch.no_grad()
    def forward(self, batch: Tensor) -> Tensor:
        h = batch.to(self.device, torch.float32) / 127.5 - 1
        for conv in self.convs:
            h = torch.relu(conv(h))
        return h.mean(dim=(2, 3))


# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass
class FeatureStats:
    """Features of one image set and their Gaussian fit (float64 ``mu``, ``sigma``)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray  # N x D float32, kept for KID

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStats:
        if features.shape[0] < 2:
            raise FIDError(f"FID needs at least 2 images, got {features.shape[0]}")
        f64 = features.astype(np.float64)
        return cls(f64.mean(axis=0), np.cov(f64, rowvar=False), features.astype(np.float32))

    @property
    def count(self) -> int:
        return int(self.features.shape[0])

    def save(self, path: str | os.PathLike, key: dict) -> None:
        """Atomically, as an ``.npz`` that also holds the key it was computed for (as JSON)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        key_bytes = np.frombuffer(json.dumps(key, sort_keys=True).encode(), dtype=np.uint8)
        write_atomic(path, lambda fh: np.savez(fh, mu=self.mu, sigma=self.sigma,
                                               features=self.features, key=key_bytes))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        with np.load(path) as z:
            return cls(z["mu"], z["sigma"], z["features"])


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """The Fréchet distance between the two Gaussian fits:
    |μa − μb|² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½.

    The trace of the matrix square root comes from symmetric eigendecompositions (eigh), equal
    to clean-fid's ``sqrtm(Σa Σb)`` form up to rounding, but exact for the singular covariances
    of a few images, fast at any size, and free of ``sqrtm``'s ``disp`` argument (gone in
    SciPy 1.18).
    """
    w, v = np.linalg.eigh(a.sigma)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root_a @ b.sigma @ root_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


def kid_from_stats(a: FeatureStats, b: FeatureStats, seed: int = 0) -> float:
    """clean-fid's kernel inception distance (100 subsets of up to 1000), with a fixed seed."""
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()  # kernel_distance draws its subsets from numpy's global RNG
    try:
        np.random.seed(seed)
        return kernel_distance(a.features.astype(np.float64), b.features.astype(np.float64))
    finally:
        np.random.set_state(state)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score of N x K classifier logits: exp(E_x KL(p(y|x) ‖ p(y))) on each of
    ``splits`` consecutive parts of the N samples (p(y) the part's mean), as (mean, std) over
    the parts: the standard definition (Salimans et al. 2016; 10 splits). 1 for identical
    predictions, K at most.
    """
    if logits.ndim != 2 or logits.shape[0] < splits:
        raise FIDError(f"the Inception Score needs at least {splits} samples (one per split), "
                       f"got {logits.shape[0]}")
    log_p = logits.astype(np.float64)
    log_p = log_p - log_p.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    n, scores = log_p.shape[0], []
    for k in range(splits):
        part = log_p[k * n // splits:(k + 1) * n // splits]
        log_marginal = np.log(np.exp(part).mean(axis=0))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _classifier(extractor: FeatureExtractor) -> Callable[[Tensor], Tensor]:
    logits = getattr(extractor, "logits", None)
    if logits is None:
        raise FIDError(f"{extractor.name} has no classifier: the Inception Score needs the "
                       "inception (or demo) features")
    return logits


def classifier_logits(extractor: FeatureExtractor, features: np.ndarray) -> np.ndarray:
    """The extractor's classifier logits of N x D ``features`` (N x K), or FIDError."""
    return _classifier(extractor)(torch.from_numpy(features)).float().cpu().numpy()


@dataclass(frozen=True)
class Shard:
    """This process's share of a batched computation over ``world`` processes: the batches
    ``rank, rank + world, ...``. :meth:`current` reads the initialised ``torch.distributed``
    group (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Shard:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.world == self.rank

    def gather(self, mine: list[np.ndarray]) -> np.ndarray:
        """Every rank's per-batch arrays (this one's in ``mine``), concatenated in batch order,
        on every rank."""
        if self.world == 1:
            return np.concatenate(mine)
        everyone: list = [None] * self.world
        torch.distributed.all_gather_object(everyone, mine)
        count = sum(len(batches) for batches in everyone)
        return np.concatenate([everyone[b % self.world][b // self.world] for b in range(count)])

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (each node may see its own files)."""
        if self.world == 1:
            return flag
        everyone: list = [None] * self.world
        torch.distributed.all_gather_object(everyone, bool(flag))
        return all(everyone)


def to_uint8_levels(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> float in [0, 255] rounded to integers (the inverse of the reader's)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round()


def _features_of(batches: Iterator[Tensor], extractor: FeatureExtractor, shard: Shard) -> np.ndarray:
    """Features of ``shard``'s batches, gathered from every rank in batch order."""
    return shard.gather([extractor(b).float().cpu().numpy() for b in batches])


class _PreparedImages(torch.utils.data.Dataset):
    """The first ``count`` images of a split at ``resolution``, prepared for the extractor."""

    def __init__(self, ds: MultiResolutionDataset, resolution: int, count: int, prepare: Callable):
        self.ds, self.resolution, self.count, self.prepare = ds, resolution, count, prepare

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Tensor:
        return self.prepare(self.ds[(i, self.resolution, False)].float())


def stats_key(data: str | os.PathLike, resolution: int, split: str, count: int, extractor_name: str) -> dict:
    """What the data statistics depend on; its hash names the cache file."""
    meta = MultiResolutionDataset(data, split=split).meta
    return {
        "version": STATS_VERSION,
        "data": os.path.realpath(data),
        "metadata": hashlib.sha256(meta.to_json()).hexdigest(),
        "resolution": int(resolution),
        "split": split,
        "count": int(count),
        "extractor": extractor_name,
    }


def default_stats_dir(data: str | os.PathLike) -> Path:
    """``<data>.fid-stats/`` beside the LMDB (a folder or a single file)."""
    p = Path(os.path.realpath(data))
    return p.with_name(p.name + ".fid-stats")


def data_statistics(
    data: str | os.PathLike,
    resolution: int,
    extractor: FeatureExtractor,
    *,
    split: str = "train",
    count: int | None = None,
    batch: int = 64,
    num_workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
    shard: Shard | None = None,
) -> tuple[FeatureStats, Path | None, bool]:
    """Statistics of the first ``count`` images (default all) of ``split`` at ``resolution``.

    Returns ``(stats, cache file or None, whether it was read from the cache)``. With
    ``cache_dir`` the result is kept there as ``fid-<split>-<res>-<count>-<hash>.npz``, keyed
    by :func:`stats_key`; a cache that cannot be written is skipped, not fatal. ``shard``
    (:meth:`Shard.current` from a command under ``accelerate launch``; default: this process
    alone) shares the batches out over the processes, which must all call this; the cache is
    read only if every rank has it and written by rank 0.
    """
    shard = Shard() if shard is None else shard
    try:
        ds = MultiResolutionDataset(data, split=split)
    except DatasetError as exc:
        raise FIDError(str(exc)) from exc
    if resolution not in ds.meta.codecs:
        raise FIDError(f"{data} has no {resolution}x{resolution} level (it has "
                       f"{', '.join(map(str, ds.resolutions))})")
    n = len(ds) if count is None else min(count, len(ds))
    key = stats_key(data, resolution, split, n, extractor.name)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    file = Path(cache_dir) / f"fid-{split}-{resolution}-{n}-{digest}.npz" if cache_dir else None
    if file is not None and shard.all_true(file.is_file()):
        return FeatureStats.load(file), file, True
    batches = [list(range(start, min(start + batch, n))) for start in range(0, n, batch)]
    loader = torch.utils.data.DataLoader(_PreparedImages(ds, resolution, n, extractor.prepare),
                                         batch_sampler=batches[shard.rank::shard.world],
                                         num_workers=num_workers)
    stats = FeatureStats.of(_features_of(iter(loader), extractor, shard))
    if file is not None and shard.rank == 0:
        try:
            stats.save(file, key)
        except OSError:
            file = None
    return stats, file, False


@torch.no_grad()
def generated_images(generator: nn.Module, fade_alpha: float, latent_dim: int, count: int, *,
                     batch: int = 64, device: str | torch.device = "cpu", seed: int = 0,
                     shard: Shard = Shard()) -> Iterator[Tensor]:
    """``count`` samples ``g(z)`` in batches, as [0, 255] integer-valued floats on the CPU;
    only ``shard``'s batches (default: all).

    ``z`` is drawn on the CPU from ``seed`` for every batch, so the samples do not depend on
    the device or on how the batches are shared out.
    """
    gen = torch.Generator().manual_seed(seed)
    for index, start in enumerate(range(0, count, batch)):
        z = torch.randn(min(batch, count - start), latent_dim, generator=gen)
        if shard.owns(index):
            yield to_uint8_levels(generator(z.to(device), fade_alpha)).cpu()


def images_statistics(images: Iterator[Tensor], extractor: FeatureExtractor, num_workers: int = 0,
                      shard: Shard = Shard()) -> FeatureStats:
    """Statistics of batches of [0, 255] images (N x 3 x R x R), prepared in ``num_workers``
    threads of this process (PIL's resize releases the GIL). With a ``shard``, ``images`` are
    its batches and the statistics are those of every rank's."""
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        prepared = (torch.stack(list(pool.map(extractor.prepare, b))) for b in images)
        return FeatureStats.of(_features_of(prepared, extractor, shard))


METRICS = ("fid", "kid", "is")


@dataclass
class FIDResult:
    fid: float | None  # None where not asked for (``metrics``)
    kid: float | None
    inception_score: tuple[float, float] | None  # (mean, std over the splits)
    num_fake: int
    num_real: int  # 0 where no data statistics were needed (IS alone)
    stats_file: Path | None  # the data statistics' cache file
    stats_cached: bool  # read from it rather than computed


def fid_of_generator(
    generator: nn.Module,
    fade_alpha: float,
    latent_dim: int,
    resolution: int,
    data: str | os.PathLike,
    extractor: FeatureExtractor,
    *,
    num_samples: int = 10_000,
    split: str = "train",
    num_real: int | None = None,
    batch: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    metrics: tuple[str, ...] = ("fid", "kid"),
    inception_score_splits: int = 10,
    shard: Shard | None = None,
) -> FIDResult:
    """``metrics`` (of :data:`METRICS`) of ``num_samples`` samples against the data's ``split``
    at ``resolution`` (the IS needs no data). With ``shard`` (:meth:`Shard.current` under
    ``accelerate launch``) the work is shared out over the processes, which must all call
    this, and every rank returns the same result; default: this process alone."""
    unknown = set(metrics) - set(METRICS)
    if unknown or not metrics:
        raise FIDError(f"metrics must be some of {', '.join(METRICS)}, got {', '.join(metrics)}")
    if "is" in metrics:
        _classifier(extractor)  # its one-line error before any sampling
    shard = Shard() if shard is None else shard
    real, file, cached = None, None, False
    if {"fid", "kid"} & set(metrics):
        real, file, cached = data_statistics(data, resolution, extractor, split=split, count=num_real,
                                             batch=batch, num_workers=num_workers,
                                             cache_dir=cache_dir, shard=shard)
    fake = images_statistics(generated_images(generator, fade_alpha, latent_dim, num_samples, batch=batch,
                                              device=device, seed=seed, shard=shard),
                             extractor, num_workers, shard)
    return FIDResult(
        fid=fid_from_stats(fake, real) if "fid" in metrics else None,
        kid=kid_from_stats(fake, real, seed) if "kid" in metrics else None,
        inception_score=(inception_score(classifier_logits(extractor, fake.features),
                                         inception_score_splits) if "is" in metrics else None),
        num_fake=fake.count, num_real=real.count if real is not None else 0,
        stats_file=file, stats_cached=cached)
