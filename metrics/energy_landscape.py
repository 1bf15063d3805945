"""The energy landscape in the generator's latent space (paper §4.3, Fig. 11).

The landscape is ``U(z) = −f_α(g_θ(z))``: the energy of the image the generator makes of ``z``.
Mapping it takes four steps, each a function here:

1. :func:`descend`: gradient descent on ``U`` from many starts (prior samples, encoded images)
   to local minima. With ``on_sphere`` every iterate is projected back onto the sphere of
   radius √d: the generator pixel-normalises ``z``, so ``U`` depends on its direction only, and
   that sphere is where the prior's samples (and the training) live.
2. :func:`merge_duplicates`: minima whose images differ by less than ``merge_rms`` (root mean
   square, in the images' [−1, 1] units) are one minimum; the lowest represents them and counts
   the starts that reached any of them as its members.
3. :func:`path_barriers`: for every pair of minima the highest ``U`` along the path between
   them (the straight line, or the great circle on the sphere): an upper bound on the lowest
   barrier. :func:`relax_paths` lowers the bounds with a nudged elastic band (NEB: the path's
   inner points slide down ``U`` perpendicular to the path while springs keep them evenly
   spaced), on the pairs that can shape the graph: the edges of the straight paths' merge tree
   and each minimum's ``neb_neighbours`` nearest minima (every pair for a few minima).
4. :func:`map_landscape` groups minima into basins (two minima share a basin when the climb
   from the higher of them to their barrier is below ``barrier_threshold``, and transitively)
   and builds the merge tree of the basins: Kruskal's algorithm over the inter-basin barriers
   (the lowest barrier between any of their minima), i.e. the minimax ("lowest known barrier")
   tree a disconnectivity graph draws (Becker & Karplus 1997; Hill, Nijkamp & Zhu 2019).

Everything works for any ``generator`` (B x d -> B x ...) and ``energy`` (-> B) callables; the
tests use closed-form wells through an identity generator. ``tools/energy_landscape.py`` draws
the result (:func:`draw_disconnectivity`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..files import write_atomic

Progress = Callable[[str, int, int], None]  # (phase, done, total)


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


@dataclass(frozen=True)
class LandscapeConfig:
    descent_steps: int = 300  # Adam steps from each start
    descent_lr: float = 0.05  # Adam's learning rate, cosine-annealed to 0 over the steps
    on_sphere: bool = True  # keep every z on the sphere of radius sqrt(d) (see the module doc)
    merge_rms: float = 0.02  # minima whose images differ by less (RMS, [-1, 1] units) are one
    path_points: int = 24  # points on each path between two minima, both ends included
    neb_steps: int = 0  # NEB iterations (0: straight paths only)
    neb_neighbours: int = 8  # NEB on the merge tree's pairs and each minimum's nearest this many
    neb_lr: float = 0.02
    neb_spring: float = 1.0
    barrier_threshold: float | None = None  # None: a tenth of the minima's energy spread
    batch: int = 256  # images per network call

    def __post_init__(self) -> None:
        if self.descent_steps < 1 or self.path_points < 3 or self.neb_steps < 0 or self.batch < 1:
            raise ValueError("descent_steps >= 1, path_points >= 3, neb_steps >= 0 and batch >= 1")


class LatentEnergy:
    """``U(z) = −f(g(z))`` in batches: ``energy(z)`` -> B, ``gradient(z)`` -> (B, B x d)."""

    def __init__(self, generator: Callable[[Tensor], Tensor], energy: Callable[[Tensor], Tensor],
                 batch: int = 256) -> None:
        self.generator, self.energy_net, self.batch = generator, energy, batch

    def images(self, z: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([self.generator(c) for c in z.split(self.batch)])

    def __call__(self, z: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([-self.energy_net(self.generator(c)).reshape(-1)
                              for c in z.split(self.batch)])

    def gradient(self, z: Tensor) -> tuple[Tensor, Tensor]:
        values, grads = [], []
        for chunk in z.split(self.batch):
            chunk = chunk.detach().requires_grad_(True)
            with torch.enable_grad():
                u = -self.energy_net(self.generator(chunk)).reshape(-1)
                (g,) = torch.autograd.grad(u.sum(), chunk)  # samples are independent: per-z gradients
            values.append(u.detach())
            grads.append(g)
        return torch.cat(values), torch.cat(grads)


def _to_sphere(z: Tensor) -> Tensor:
    return z * (math.sqrt(z.shape[1]) / z.norm(dim=1, keepdim=True).clamp_min(1e-12))


def descend(landscape: LatentEnergy, starts: Tensor, cfg: LandscapeConfig,
            progress: Progress = _no_progress) -> tuple[Tensor, Tensor]:
    """N x d starts -> (N x d local minima, their N energies), by Adam on ``U`` (one optimiser
    state for all: Adam's moments are per coordinate, so the starts do not interact)."""
    z = (_to_sphere(starts) if cfg.on_sphere else starts).clone().requires_grad_(True)
    optimiser = torch.optim.Adam([z], lr=cfg.descent_lr)
    for step in range(cfg.descent_steps):
        for group in optimiser.param_groups:
            group["lr"] = cfg.descent_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.descent_steps))
        _, grad = landscape.gradient(z)
        z.grad = grad
        optimiser.step()
        if cfg.on_sphere:
            with torch.no_grad():
                z.copy_(_to_sphere(z))
        progress("descent", step + 1, cfg.descent_steps)
    z = z.detach()
    return z, landscape(z)


def merge_duplicates(images: Tensor, energies: Tensor, merge_rms: float) -> tuple[list[int], list[int]]:
    """Group the N minima whose images lie within ``merge_rms`` of a lower one.

    Returns (``representatives``: the index of each distinct minimum, lowest energy first;
    ``assignment``: for each of the N, the position in ``representatives`` it merged into).
    """
    flat = images.reshape(images.shape[0], -1).float()
    # RMS distance between every pair, on the host (N x N: small), one transfer.
    rms = (torch.cdist(flat, flat) / math.sqrt(flat.shape[1])).cpu()
    order = torch.argsort(energies).tolist()
    representatives: list[int] = []
    assignment = [0] * len(order)
    for i in order:
        close = [k for k, r in enumerate(representatives) if rms[i, r] < merge_rms]
        if close:
            assignment[i] = close[0]
        else:
            assignment[i] = len(representatives)
            representatives.append(i)
    return representatives, assignment


def _path(a: Tensor, b: Tensor, points: int, on_sphere: bool) -> Tensor:
    """``points`` x d from a to b: the great circle (radius sqrt(d)) or the straight line."""
    t = torch.linspace(0, 1, points, dtype=a.dtype, device=a.device)[:, None]
    if not on_sphere:
        return a + t * (b - a)
    u, v = a / a.norm(), b / b.norm()
    omega = torch.acos((u @ v).clamp(-1 + 1e-7, 1 - 1e-7))
    path = (torch.sin((1 - t) * omega) * u + torch.sin(t * omega) * v) / torch.sin(omega)
    return _to_sphere(path)


def path_barriers(landscape: LatentEnergy, minima: Tensor, cfg: LandscapeConfig,
                  progress: Progress = _no_progress) -> np.ndarray:
    """M x M: the highest ``U`` on the path between each pair of minima (diagonal: ``U`` itself)."""
    m = minima.shape[0]
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    barriers = np.zeros((m, m))
    barriers[np.diag_indices(m)] = landscape(minima).double().cpu().numpy()
    per_call = max(1, cfg.batch // cfg.path_points)
    for start in range(0, len(pairs), per_call):
        chunk = pairs[start:start + per_call]
        paths = torch.cat([_path(minima[i], minima[j], cfg.path_points, cfg.on_sphere) for i, j in chunk])
        peaks = landscape(paths).view(len(chunk), cfg.path_points).amax(dim=1).double()
        for (i, j), peak in zip(chunk, peaks.tolist()):
            barriers[i, j] = barriers[j, i] = peak
        progress("barriers", min(start + per_call, len(pairs)), len(pairs))
    return barriers


def relax_paths(landscape: LatentEnergy, minima: Tensor, pairs: list[tuple[int, int]],
                cfg: LandscapeConfig, progress: Progress = _no_progress) -> list[float]:
    """The highest ``U`` on each pair's path after ``cfg.neb_steps`` of a nudged elastic band.

    Each inner point moves along the component of −∇U perpendicular to the path (its local
    tangent) plus a spring force along the tangent that evens out the spacing; the ends stay at
    the minima. All pairs' bands move at once.
    """
    if not pairs:
        return []
    bands = torch.stack([_path(minima[i], minima[j], cfg.path_points, cfg.on_sphere) for i, j in pairs])
    n, k, d = bands.shape
    best = landscape(bands.reshape(-1, d)).view(n, k).amax(dim=1)
    for step in range(cfg.neb_steps):
        inner = bands[:, 1:-1]
        _, grad = landscape.gradient(inner.reshape(-1, d))
        grad = grad.view(n, k - 2, d)
        tangent = bands[:, 2:] - bands[:, :-2]
        tangent = tangent / tangent.norm(dim=2, keepdim=True).clamp_min(1e-12)
        perpendicular = grad - (grad * tangent).sum(dim=2, keepdim=True) * tangent
        spacing = ((bands[:, 2:] - inner).norm(dim=2) - (inner - bands[:, :-2]).norm(dim=2))
        force = -perpendicular + cfg.neb_spring * spacing[..., None] * tangent
        moved = inner + cfg.neb_lr * force
        if cfg.on_sphere:
            moved = _to_sphere(moved.reshape(-1, d)).view(n, k - 2, d)
        bands = torch.cat([bands[:, :1], moved, bands[:, -1:]], dim=1)
        peaks = landscape(bands.reshape(-1, d)).view(n, k).amax(dim=1)
        best = torch.minimum(best, peaks)  # the lowest path seen: still an upper bound
        progress("elastic band", step + 1, cfg.neb_steps)
    return best.double().tolist()


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)


def minimax_edges(barriers: np.ndarray, groups: list[int] | None = None) -> list[tuple[float, int, int]]:
    """Kruskal's algorithm over the M x M barriers: the (barrier, i, j) edges, lowest first, that
    join the minima (or, with ``groups``, the groups they belong to) into one tree. Every pair is
    then connected at the lowest barrier of any path between them through the tree."""
    m = barriers.shape[0]
    groups = list(range(m)) if groups is None else groups
    edges = sorted((barriers[i, j], i, j) for i in range(m) for j in range(i + 1, m)
                   if groups[i] != groups[j])
    forest, chosen = _UnionFind(max(groups) + 1 if groups else 0), []
    for value, i, j in edges:
        if forest.find(groups[i]) != forest.find(groups[j]):
            forest.union(groups[i], groups[j])
            chosen.append((float(value), i, j))
    return chosen


def neb_pairs(minima: Tensor, barriers: np.ndarray, neighbours: int) -> list[tuple[int, int]]:
    """The pairs worth relaxing: the straight paths' merge-tree edges, and each minimum with
    its ``neighbours`` nearest (latent distance)."""
    pairs = {(i, j) for _, i, j in minimax_edges(barriers)}
    distances = torch.cdist(minima.double(), minima.double())
    for i in range(minima.shape[0]):
        for j in distances[i].argsort()[1:neighbours + 1].tolist():
            pairs.add((min(i, j), max(i, j)))
    return sorted(pairs)


@dataclass
class Basin:
    minimum: int  # index of its lowest minimum (into Landscape.minima)
    energy: float  # U at that minimum
    minima: list[int]  # every minimum grouped into it
    members: int  # starts that descended into it


@dataclass
class Merge:
    energy: float  # the barrier at which the two subtrees join
    left: int  # node ids: 0..B-1 are basins, B.. are earlier merges
    right: int
    node: int


@dataclass
class Landscape:
    """The map: distinct minima, barriers between them, basins and their merge tree."""

    minima: Tensor  # M x d latent codes, lowest energy first
    energies: list[float]  # M
    members: list[int]  # M: starts that reached each (duplicates included)
    start_kinds: list[dict[str, int]]  # M: those starts by kind ('prior', 'encoded')
    barriers: np.ndarray  # M x M (diagonal: the minima's energies)
    barrier_threshold: float
    basins: list[Basin]  # lowest first
    merges: list[Merge]  # lowest first; B - 1 of them for B basins
    settings: dict[str, Any] = field(default_factory=dict)

    def leaf_order(self) -> list[int]:
        """Basin ids left to right so that no branches of the tree cross (lower subtree left)."""
        children = {m.node: (m.left, m.right) for m in self.merges}
        lowest = {b: basin.energy for b, basin in enumerate(self.basins)}
        for m in self.merges:
            lowest[m.node] = min(lowest[m.left], lowest[m.right])

        if not self.merges:
            return list(range(len(self.basins)))
        order, stack = [], [self.merges[-1].node]  # depth first, lower subtree first
        while stack:
            node = stack.pop()
            if node in children:
                stack.extend(sorted(children[node], key=lowest.__getitem__, reverse=True))
            else:
                order.append(node)
        return order

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "barrier_threshold": self.barrier_threshold,
            "minima": [{"index": i, "energy": e, "members": n, "starts": kinds,
                        "basin": next(b for b, basin in enumerate(self.basins) if i in basin.minima),
                        "z": [round(v, 6) for v in self.minima[i].tolist()]}
                       for i, (e, n, kinds) in enumerate(zip(self.energies, self.members, self.start_kinds))],
            "barriers": [[float(v) for v in row] for row in self.barriers],
            "basins": [{"id": b, "minimum": basin.minimum, "energy": basin.energy,
                        "minima": basin.minima, "members": basin.members}
                       for b, basin in enumerate(self.basins)],
            "merges": [vars(m) for m in self.merges],
            "leaf_order": self.leaf_order(),
        }


def group_basins(barriers: np.ndarray, threshold: float) -> list[int]:
    """For each minimum, its basin's number: minima i, j share one when the climb from the
    higher of them, ``barriers[i, j] − max(U_i, U_j)``, is below ``threshold`` (transitively)."""
    m = barriers.shape[0]
    energies = np.diag(barriers)
    forest = _UnionFind(m)
    for i in range(m):
        for j in range(i + 1, m):
            if barriers[i, j] - max(energies[i], energies[j]) < threshold:
                forest.union(i, j)
    roots: dict[int, int] = {}
    return [roots.setdefault(forest.find(i), len(roots)) for i in range(m)]


def map_landscape(landscape: LatentEnergy, starts: Tensor, cfg: LandscapeConfig, *,
                  start_kinds: list[str] | None = None,
                  progress: Progress = _no_progress) -> Landscape:
    """Descend from the N x d ``starts``, merge duplicates, estimate barriers, group basins and
    build their merge tree (see the module doc)."""
    if starts.ndim != 2 or starts.shape[0] < 1:
        raise ValueError(f"starts must be N x d with N >= 1, got {tuple(starts.shape)}")
    kinds = start_kinds or ["prior"] * starts.shape[0]
    ends, end_energies = descend(landscape, starts, cfg, progress)
    representatives, assignment = merge_duplicates(landscape.images(ends), end_energies, cfg.merge_rms)
    minima = ends[representatives]
    members = [assignment.count(k) for k in range(len(representatives))]
    start_counts = [{kind: sum(1 for a, s in zip(assignment, kinds) if a == k and s == kind)
                     for kind in sorted(set(kinds))} for k in range(len(representatives))]
    barriers = path_barriers(landscape, minima, cfg, progress)
    if cfg.neb_steps:
        pairs = neb_pairs(minima, barriers, cfg.neb_neighbours)
        for (i, j), value in zip(pairs, relax_paths(landscape, minima, pairs, cfg, progress)):
            barriers[i, j] = barriers[j, i] = min(barriers[i, j], value)
    energies = np.diag(barriers).tolist()
    threshold = cfg.barrier_threshold
    if threshold is None:
        threshold = 0.1 * (max(energies) - min(energies))
    groups = group_basins(barriers, threshold)
    count = max(groups) + 1
    basin_minima = [[i for i in range(len(groups)) if groups[i] == b] for b in range(count)]
    basins = [Basin(minimum=min(ms, key=energies.__getitem__), energy=min(energies[i] for i in ms),
                    minima=ms, members=sum(members[i] for i in ms)) for ms in basin_minima]
    # Basins lowest first (renumbered), then their merge tree.
    order = sorted(range(count), key=lambda b: basins[b].energy)
    renumber = {old: new for new, old in enumerate(order)}
    basins = [basins[b] for b in order]
    groups = [renumber[g] for g in groups]
    merges, node_of, forest = [], list(range(count)), _UnionFind(count)
    for value, i, j in minimax_edges(barriers, groups):
        a, b = forest.find(groups[i]), forest.find(groups[j])
        node = count + len(merges)
        merges.append(Merge(energy=value, left=node_of[a], right=node_of[b], node=node))
        forest.union(a, b)
        node_of[forest.find(a)] = node
    settings = {k: v for k, v in vars(cfg).items()} | {"starts": starts.shape[0]}
    return Landscape(minima=minima, energies=energies, members=members, start_kinds=start_counts,
                     barriers=barriers, barrier_threshold=float(threshold), basins=basins,
                     merges=merges, settings=settings)


def draw_disconnectivity(result: Landscape, images: Tensor | None, paths: list[str],
                         title: str = "") -> None:
    """The disconnectivity graph: basins on the horizontal axis (in :meth:`Landscape.leaf_order`),
    U vertical; each basin a vertical line from its minimum up to where it joins, a horizontal
    line at each merge's barrier, a circle at each minimum sized by its members, and, with
    ``images`` (B x 3 x R x R in [−1, 1], one per basin, lowest first), the basin's minimum
    beneath it. Saved to every one of ``paths`` (the format from the suffix)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    leaves = result.leaf_order()
    x = {b: float(pos) for pos, b in enumerate(leaves)}
    height = {b: basin.energy for b, basin in enumerate(result.basins)}
    fig_width = max(6.0, 0.55 * len(leaves) + 1.5)
    fig, ax = plt.subplots(figsize=(fig_width, 5.5))
    for m in result.merges:
        for child in (m.left, m.right):
            ax.plot([x[child], x[child]], [height[child], m.energy], color="0.2", lw=1.2)
        ax.plot([x[m.left], x[m.right]], [m.energy, m.energy], color="0.2", lw=1.2)
        x[m.node], height[m.node] = (x[m.left] + x[m.right]) / 2, m.energy
    energies = [b.energy for b in result.basins]
    top = max([m.energy for m in result.merges] + energies)
    span = max(top - min(energies), 1e-6)
    root = result.merges[-1].node if result.merges else leaves[0]
    ax.plot([x[root], x[root]], [height[root], top + 0.08 * span], color="0.2", lw=1.2)
    sizes = np.array([b.members for b in result.basins], dtype=float)
    ax.scatter([x[b] for b in range(len(result.basins))], energies,
               s=30 + 400 * sizes / sizes.max(), color="tab:blue", alpha=0.7, zorder=3)
    ax.set_xlim(-0.7, len(leaves) - 0.3)
    bottom = min(energies) - 0.08 * span
    ax.set_ylim(bottom, top + 0.1 * span)
    ax.set_xticks(range(len(leaves)), [str(b) for b in leaves])
    ax.set_xlabel("basin (numbered from the lowest); circle area: starts that ended in it")
    ax.set_ylabel("energy  U(z) = -f(g(z))")
    if title:
        ax.set_title(title)
    if images is not None:
        pictures = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        zoom = 28 / pictures.shape[1]
        for b in leaves:
            box = AnnotationBbox(OffsetImage(pictures[b], zoom=zoom, interpolation="nearest"),
                                 (x[b], 0), xycoords=("data", "axes fraction"),
                                 box_alignment=(0.5, 1.0), xybox=(0, -38),
                                 boxcoords="offset points", frameon=False)
            ax.add_artist(box)
        fig.subplots_adjust(bottom=0.28)
    for path in paths:  # atomically: an earlier picture under the name survives a crash
        write_atomic(path, lambda fh, fmt=Path(path).suffix[1:]: fig.savefig(
            fh, format=fmt, dpi=120, bbox_inches="tight"))
    plt.close(fig)
