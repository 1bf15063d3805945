"""metrics/energy_landscape.py on an energy whose landscape is known, and the tool on a real run.

The known landscape: three Gaussian wells and a Gaussian hill in a 2-D latent space, through an
identity generator, U(z) = −f(z) in closed form. Its minima come from SciPy's minimiser, its
barriers from flooding a fine grid (cells added lowest first; two minima's barrier is the level
at which their cells first connect: the lowest barrier over all paths). The hill sits on the
straight line between the two deepest wells, so the straight-path estimate is far too high there
and only the nudged elastic band finds the way round it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from scipy.optimize import minimize

from triangle.metrics.energy_landscape import (
    LandscapeConfig,
    LatentEnergy,
    map_landscape,
    path_barriers,
)

WELLS = [((-2.0, 0.0), 3.0), ((2.0, 0.0), 2.6), ((0.3, 4.0), 2.0)]  # (centre, depth), width 1
HILL = ((0.0, 0.0), 1.5, 0.7)  # centre, height, width


def f(x: torch.Tensor) -> torch.Tensor:
    """The energy model's f (B x 2 -> B): U = −f has the wells as minima."""
    out = torch.zeros(x.shape[0], dtype=x.dtype)
    for centre, depth in WELLS:
        out = out + depth * torch.exp(-((x - torch.tensor(centre, dtype=x.dtype)) ** 2).sum(1) / 2)
    centre, height, width = HILL
    return out - height * torch.exp(-((x - torch.tensor(centre, dtype=x.dtype)) ** 2).sum(1) / (2 * width**2))


def u_numpy(z: np.ndarray) -> float:
    return float(-f(torch.tensor(z[None], dtype=torch.float64))[0])


def flood_barriers(points: np.ndarray, step: float = 0.02) -> dict[tuple[int, int], float]:
    """The lowest barrier between each pair of ``points`` over all grid paths in [-5, 6]²."""
    axis = np.arange(-5, 6 + step / 2, step)
    gx, gy = np.meshgrid(axis, axis, indexing="ij")
    u = -f(torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1))).numpy().reshape(gx.shape)
    width = u.shape[1]
    cells = [int(round((p[0] + 5) / step)) * width + int(round((p[1] + 5) / step)) for p in points]
    parent = -np.ones(u.size, dtype=np.int64)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    found: dict[tuple[int, int], float] = {}
    pairs = [(p, q) for p in range(len(cells)) for q in range(p + 1, len(cells))]
    for index in np.argsort(u, axis=None):
        parent[index] = index
        i, j = divmod(int(index), width)
        for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
            if 0 <= a < u.shape[0] and 0 <= b < width and parent[a * width + b] >= 0:
                parent[find(int(index))] = find(a * width + b)
        for p, q in pairs:
            if (p, q) not in found and min(parent[cells[p]], parent[cells[q]]) >= 0 \
                    and find(cells[p]) == find(cells[q]):
                found[(p, q)] = float(u.flat[index])
        if len(found) == len(pairs):
            return found
    raise AssertionError("the grid never connected the minima")


@pytest.fixture(scope="module")
def wells():
    landscape = LatentEnergy(lambda z: z, f)
    starts = torch.cartesian_prod(torch.linspace(-3.5, 3.5, 8), torch.linspace(-3.0, 5.0, 8))
    cfg = LandscapeConfig(on_sphere=False, descent_lr=0.1, neb_steps=300, barrier_threshold=0.01)
    result = map_landscape(landscape, starts, cfg)
    truth = np.array([minimize(u_numpy, np.array(c), method="BFGS", tol=1e-10).x for c, _ in WELLS])
    return landscape, cfg, result, truth


def test_finds_every_minimum(wells):
    _, _, result, truth = wells
    found = result.minima.double().numpy()
    assert found.shape == (3, 2)  # 64 descents, duplicates merged
    for z in truth:
        assert np.linalg.norm(found - z, axis=1).min() < 0.01
    assert result.energies == pytest.approx(sorted(u_numpy(t) for t in truth), abs=1e-4)
    assert sum(result.members) == 64 and min(result.members) > 0


def test_barriers_and_merge_order_match_the_flooded_landscape(wells):
    landscape, cfg, result, truth = wells
    true_barriers = flood_barriers(result.minima.double().numpy())
    # Every estimate is an upper bound on the lowest barrier (within the grid's resolution) ...
    for (p, q), value in true_barriers.items():
        assert result.barriers[p, q] >= value - 0.01
    # ... the merge tree joins (1, 2) first, then 0, at the true barriers.
    assert [(sorted((m.left, m.right)), round(m.energy, 2)) for m in result.merges] == [
        ([1, 2], round(true_barriers[(1, 2)], 2)), ([0, 3], round(true_barriers[(0, 1)], 2))]
    for m, (p, q) in zip(result.merges, [(1, 2), (0, 1)]):
        assert m.energy == pytest.approx(true_barriers[(p, q)], abs=0.01)
    # The straight path from well 0 to well 1 climbs the hill; the elastic band goes round it.
    straight = path_barriers(landscape, result.minima, cfg)
    assert straight[0, 1] > 0.5 and result.barriers[0, 1] < -0.2


def test_the_json_holds_minima_basins_and_the_merge_tree(wells):
    _, _, result, _ = wells
    record = json.loads(json.dumps(result.to_json()))  # what tools/energy_landscape.py writes
    assert [m["energy"] for m in record["minima"]] == sorted(m["energy"] for m in record["minima"])
    assert len(record["basins"]) == 3 and len(record["merges"]) == 2
    assert [m["energy"] for m in record["merges"]] == sorted(m["energy"] for m in record["merges"])
    assert sorted(record["leaf_order"]) == [0, 1, 2]
    assert np.allclose(np.diag(record["barriers"]), [m["energy"] for m in record["minima"]])
    assert all(m["basin"] == m["index"] for m in record["minima"])  # threshold below every climb


def test_the_threshold_groups_minima_into_basins(wells):
    landscape, cfg, result, _ = wells
    starts = torch.cartesian_prod(torch.linspace(-3.5, 3.5, 8), torch.linspace(-3.0, 5.0, 8))
    one = map_landscape(landscape, starts, LandscapeConfig(
        on_sphere=False, descent_lr=0.1, barrier_threshold=5.0))  # above every climb
    assert len(one.basins) == 1 and one.basins[0].members == 64 and one.merges == []
    assert one.basins[0].minimum == 0 and sorted(one.basins[0].minima) == [0, 1, 2]


def test_tool_on_a_real_run(eval_run, tmp_path):
    tool = Path(__file__).resolve().parents[1] / "tools" / "energy_landscape.py"
    spec = importlib.util.spec_from_file_location("tool_energy_landscape", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    prefix = tmp_path / "landscape"
    result = CliRunner().invoke(module.main, [str(eval_run), "--out", str(prefix), "--starts", "6",
                                              "--encoded", "2", "--steps", "4", "--path-points", "4",
                                              "--neb-steps", "2"])
    assert result.exit_code == 0, result.output
    record = json.loads(prefix.with_suffix(".json").read_text())
    minima, basins = record["minima"], record["basins"]
    assert 1 <= len(minima) <= 8 and sum(m["members"] for m in minima) == 8
    assert sum(m["starts"].get("encoded", 0) for m in minima) == 2
    assert sorted(i for b in basins for i in b["minima"]) == list(range(len(minima)))
    assert len(record["merges"]) == len(basins) - 1 and record["resolution"] == 8
    assert len(minima[0]["z"]) == 8  # the run's latent size
    with Image.open(prefix.with_suffix(".png")) as image:
        assert image.width > 300
    assert prefix.with_suffix(".svg").read_text().lstrip().startswith("<?xml")
