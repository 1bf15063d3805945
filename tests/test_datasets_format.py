"""Round trips, the box cascade, metadata errors, splits and the demo renderer."""

from __future__ import annotations

import io

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from triangle.datasets import (
    DatasetError,
    MultiResolutionDataset,
    box_downsample,
    build_levels,
    demo_source,
    read_metadata,
    render_demo_image,
    write_demo_lmdb,
    write_lmdb,
)
from triangle.datasets.writer import plan_levels

# torchvision 0.29 deprecates its image decoders (the reader falls back to PIL without them).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.*")


def _reference_levels(index: int, top: int, filter: str = "box") -> dict[int, np.ndarray]:
    return build_levels(render_demo_image(index, top, 0), plan_levels(top, filter=filter))


@pytest.mark.parametrize("codec", ["png", "jpeg"])
def test_round_trip_every_level(tmp_path, codec):
    path = tmp_path / "d.lmdb"
    meta = write_demo_lmdb(path, count=12, max_resolution=64, codec=codec, raw_max=16)
    assert meta.resolutions == [4, 8, 16, 32, 64]
    assert meta.codecs == {4: "raw", 8: "raw", 16: "raw", 32: codec, 64: codec}
    ds = MultiResolutionDataset(path, split="all")
    for i in range(12):
        ref = _reference_levels(i, 64)
        for r in meta.resolutions:
            got = ds[(i, r, False)]
            assert got.dtype == torch.uint8 and got.shape == (3, r, r)
            want = torch.from_numpy(ref[r]).permute(2, 0, 1)
            if meta.codecs[r] in ("raw", "png"):
                assert torch.equal(got, want), (i, r)
            else:  # JPEG q95, 4:4:4 chroma at these sizes
                err = (got.float() - want.float()).abs()
                assert err.mean() < 2.5 and err.max() < 40, (i, r, err.mean(), err.max())
    ds.close()


def test_cascade_levels_are_box_filter_of_level_above(tmp_path):
    path = tmp_path / "d.lmdb"
    meta = write_demo_lmdb(path, count=6, max_resolution=64, codec="png")
    ds = MultiResolutionDataset(path, split="all")
    for i in range(6):
        for r in meta.resolutions[:-1]:
            above = ds[(i, 2 * r, False)].permute(1, 2, 0).numpy()
            assert np.array_equal(ds[(i, r, False)].permute(1, 2, 0).numpy(), box_downsample(above))
    ds.close()


def test_box_filter_is_rounded_mean_and_matches_pil_reduce():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    b = box_downsample(a)
    want = (a.reshape(8, 2, 8, 2, 3).astype(int).sum(axis=(1, 3)) + 2) // 4
    assert np.array_equal(b, want)
    assert np.array_equal(b, np.asarray(Image.fromarray(a).reduce(2)))


def test_lanczos_option_and_flip_and_float(tmp_path):
    path = tmp_path / "d.lmdb"
    meta = write_demo_lmdb(path, count=4, max_resolution=32, filter="lanczos", raw_max=32)
    assert meta.filter == "lanczos"
    ds = MultiResolutionDataset(path, split="all")
    ref = _reference_levels(1, 32, "lanczos")
    assert np.array_equal(ds[(1, 8, False)].permute(1, 2, 0).numpy(), ref[8])
    assert torch.equal(ds[(1, 16, True)], ds[(1, 16, False)].flip(2))
    f = ds.image(1, 16, as_float=True)
    assert f.dtype == torch.float32 and f.min() >= -1 and f.max() <= 1
    assert torch.allclose(f, ds[(1, 16, False)].float() / 127.5 - 1)
    with pytest.raises(DatasetError, match="available: 4, 8, 16, 32"):
        ds[(0, 64, False)]
    ds.close()


def test_splits_are_disjoint_and_cover(tmp_path):
    path = tmp_path / "d.lmdb"
    meta = write_demo_lmdb(path, count=50, max_resolution=8, holdout=10)
    assert len(meta.test_indices) == 10
    again = write_demo_lmdb(tmp_path / "e.lmdb", count=50, max_resolution=8, holdout=10)
    assert again.test_indices == meta.test_indices  # deterministic choice
    train, test = MultiResolutionDataset(path, "train"), MultiResolutionDataset(path, "test")
    assert len(train) == 40 and len(test) == 10
    tr, te = set(train.indices.tolist()), set(test.indices.tolist())
    assert not tr & te and tr | te == set(range(50))
    assert te == set(meta.test_indices)
    # The i-th test item is dataset image test_indices[i].
    full = MultiResolutionDataset(path, "all")
    assert torch.equal(test[(3, 8, False)], full[(meta.test_indices[3], 8, False)])
    for d in (train, test, full):
        d.close()
    no_holdout = write_demo_lmdb(tmp_path / "f.lmdb", count=5, max_resolution=8)
    assert no_holdout.test_indices == ()
    with pytest.raises(DatasetError, match="holdout"):
        MultiResolutionDataset(tmp_path / "f.lmdb", "test")


def test_metadata_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        read_metadata(tmp_path / "missing.lmdb")
    (tmp_path / "notlmdb").write_bytes(b"hello")
    with pytest.raises(DatasetError, match="not an LMDB"):
        read_metadata(tmp_path / "notlmdb")
    env = lmdb.open(str(tmp_path / "other.lmdb"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"foo", b"bar")
    env.close()
    with pytest.raises(DatasetError, match="without dataset metadata"):
        read_metadata(tmp_path / "other.lmdb")
    path = tmp_path / "d.lmdb"
    write_demo_lmdb(path, count=3, max_resolution=8)
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"__meta__", txn.get(b"__meta__").replace(b'"format_version": 1', b'"format_version": 99'))
    env.close()
    with pytest.raises(DatasetError, match="version 99"):
        read_metadata(path)


def test_map_grows_when_full(tmp_path):
    meta = write_demo_lmdb(tmp_path / "d.lmdb", count=40, max_resolution=64, map_size=64 << 10)
    assert meta.count == 40


def test_existing_dataset_needs_overwrite(tmp_path):
    path = tmp_path / "d.lmdb"
    write_demo_lmdb(path, count=3, max_resolution=8)
    with pytest.raises(DatasetError, match="--overwrite"):
        write_demo_lmdb(path, count=3, max_resolution=8)
    assert write_demo_lmdb(path, count=5, max_resolution=8, overwrite=True).count == 5


def test_demo_renderer_deterministic_and_varied():
    a = render_demo_image(7, 32, seed=3)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, render_demo_image(7, 32, seed=3))
    assert not np.array_equal(a, render_demo_image(7, 32, seed=4))
    imgs = np.stack([render_demo_image(i, 32) for i in range(16)]).astype(float)
    assert imgs.std(axis=0).mean() > 20  # images differ from each other
    # Same scene at two resolutions: the box-filtered larger render is close to the smaller one.
    big = box_downsample(box_downsample(render_demo_image(5, 128)))
    assert np.abs(big.astype(float) - render_demo_image(5, 32)).mean() < 6


def test_png_jpeg_records_are_real_files(tmp_path):
    path = tmp_path / "d.lmdb"
    write_lmdb(path, demo_source(2), max_resolution=32, raw_max=8, codec="png")
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        assert Image.open(io.BytesIO(txn.get(b"r32/00000001"))).format == "PNG"
        assert len(txn.get(b"r8/00000001")) == 8 * 8 * 3
    env.close()
