"""tools/prepare_lmdb.py end to end: a killed preparation resumes, bad files are skipped and
reported, StyleGAN-port LMDBs read back, and wrong input is a one-line error."""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from triangle.datasets import (
    DatasetError,
    MultiResolutionDataset,
    box_downsample,
    folder_source,
    read_metadata,
    verify_lmdb,
    write_demo_lmdb,
    write_lmdb,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.*")
ROOT = Path(__file__).resolve().parents[1]
TOOL = [sys.executable, str(ROOT / "tools" / "prepare_lmdb.py")]


def _load_tool():
    spec = importlib.util.spec_from_file_location("prepare_lmdb", ROOT / "tools" / "prepare_lmdb.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cli


CLI = _load_tool()


def _cli(*args, check=True):
    """Run the click command in this process (a subprocess only where it must be killed)."""
    p = CliRunner().invoke(CLI, [str(a) for a in args])
    if check:
        assert p.exit_code == 0, p.output + repr(p.exception)
    return p


def _records(path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        out = dict(txn.cursor().iternext())
    env.close()
    return out


def _progress(path) -> int:
    if not (Path(path) / "data.mdb").exists():
        return 0
    env = lmdb.open(str(path), readonly=True)
    try:
        with env.begin() as txn:
            raw = txn.get(b"__prep__")
        return 0 if raw is None else int(__import__("json").loads(raw)["next_item"])
    finally:
        env.close()


def test_killed_preparation_resumes_to_a_complete_verified_lmdb(tmp_path):
    out = tmp_path / "demo.lmdb"
    args = ["demo", "--out", out, "--count", 4000, "--max-res", 64, "--codec", "png", "--raw-max", 16,
            "--batch-size", 40, "--workers", 2, "--holdout", 100]
    proc = subprocess.Popen(TOOL + [str(a) for a in args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while _progress(out) < 400 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker processes, mid-way
    finally:
        proc.wait()
    done = _progress(out)
    assert 400 <= done < 4000
    with pytest.raises(DatasetError, match="interrupted"):
        read_metadata(out)
    assert _cli("verify", out, check=False).exit_code != 0  # never looks complete

    # Another preparation on a copy of the remains restarts cleanly instead of mixing inputs.
    other = tmp_path / "other.lmdb"
    shutil.copytree(out, other)
    assert write_demo_lmdb(other, count=30, max_resolution=16).count == 30

    resumed = _cli(*args)
    assert f"resumed at item {done} of 4000" in resumed.stdout
    assert "every record decoded" in _cli("verify", out).stdout
    meta = read_metadata(out)
    assert meta.count == 4000 and len(meta.test_indices) == 100
    clean = tmp_path / "clean.lmdb"
    write_demo_lmdb(clean, count=4000, max_resolution=64, codec="png", raw_max=16, holdout=100)
    assert _records(out) == _records(clean)  # byte for byte what an uninterrupted run writes


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _make_messy_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (root / "sub" / "deeper").mkdir(parents=True)
    noise.save(root / "a_good.jpg", quality=95)
    noise.save(root / "sub" / "deeper" / "nested.png")
    noise.save(root / "b.webp")
    Image.new("L", (48, 48), 90).save(root / "gray.png")
    Image.new("RGBA", (48, 48), (255, 0, 0, 0)).save(root / "rgba.png")  # transparent -> white
    Image.new("RGB", (48, 48), (0, 200, 0)).convert("P", palette=Image.ADAPTIVE).save(root / "palette.png")
    Image.new("CMYK", (48, 48), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    Image.fromarray(np.full((48, 48), 30000, dtype=np.uint16)).save(root / "deep16.png")
    # 80 wide x 40 high, left red / right blue, displayed rotated 90 degrees clockwise.
    side = np.zeros((40, 80, 3), np.uint8)
    side[:, :40] = (255, 0, 0)
    side[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "exif_rotated.jpg").write_bytes(_jpeg(Image.fromarray(side), exif=exif.tobytes()))
    Image.new("RGB", (100, 50), (10, 20, 30)).save(root / "wide.png")
    Image.new("RGB", (10, 10), (200, 100, 0)).save(root / "tiny.png")
    (root / "truncated.jpg").write_bytes(_jpeg(noise)[:1500])
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image\n")
    (root / ".DS_Store").write_bytes(b"\0\0")  # hidden: not even listed


BAD = {"truncated.jpg", "empty.jpg", "notes.txt"}


def test_messy_folder_is_converted_and_bad_files_reported(tmp_path):
    src = tmp_path / "photos"
    _make_messy_folder(src)
    out = tmp_path / "f.lmdb"
    p = _cli("folder", src, "--out", out, "--max-res", 32, "--verify")
    assert "skipped 3" in p.stdout, p.stdout
    for name in BAD:
        assert name in p.stdout
    assert "every record decoded" in p.stdout
    names = [n for n in folder_source(src).names if Path(n).name not in BAD]
    meta = read_metadata(out)
    assert meta.count == len(names) == 11
    ds = MultiResolutionDataset(out, "all")

    def px(name):
        return ds[(names.index(name), 32, False)].permute(1, 2, 0).numpy().astype(int)

    assert np.abs(px("deep16.png") - 117).max() <= 1  # 30000/65535*255, not clipped to 255
    assert px("rgba.png").min() >= 250  # transparent over white
    assert np.abs(px("gray.png") - 90).max() <= 1
    assert np.abs(px("palette.png") - [0, 200, 0]).max() <= 8
    assert px("cmyk.jpg")[..., 0].mean() > 200 and px("cmyk.jpg")[..., 1:].mean() < 60
    rot = px("exif_rotated.jpg")  # upright: top red, bottom blue
    assert rot[:12, :, 0].mean() > 200 and rot[-12:, :, 2].mean() > 200
    assert np.abs(px("wide.png") - [10, 20, 30]).max() <= 1
    assert np.abs(px("tiny.png") - [200, 100, 0]).max() <= 2  # upscaled
    ds.close()
    report = write_lmdb(tmp_path / "g.lmdb", folder_source(src), max_resolution=32, small="skip")
    assert dict(report.skipped)["tiny.png"].startswith("too small")
    assert report.written == 10


def test_stylegan_port_layout_reads_back(tmp_path):
    path = tmp_path / "port.lmdb"
    imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8))
            for i in range(5)]
    env = lmdb.open(str(path), map_size=1 << 26, readahead=False)
    with env.begin(write=True) as txn:  # as rosinality's prepare_data.py writes it
        for i, img in enumerate(imgs):
            for size in (8, 16, 32):
                buf = io.BytesIO()
                img.resize((size, size), Image.LANCZOS).save(buf, format="jpeg", quality=100)
                txn.put(f"{size}-{str(i).zfill(5)}".encode(), buf.getvalue())
        txn.put(b"length", b"5")
    env.close()
    stored16 = _records(path)[b"16-00002"]
    meta = read_metadata(path)
    assert meta.layout == "stylegan-port" and meta.count == 5
    assert meta.resolutions == [4, 8, 16, 32] and meta.derived == (4,)
    ds = MultiResolutionDataset(path, "all")
    assert len(ds) == 5
    x8 = ds[(2, 8, False)]
    with Image.open(io.BytesIO(stored16)) as im:
        assert np.abs(ds[(2, 16, False)].permute(1, 2, 0).numpy().astype(int) - np.asarray(im)).max() <= 1
    assert torch.equal(ds[(2, 4, False)], torch.from_numpy(box_downsample(x8.permute(1, 2, 0).numpy())).permute(2, 0, 1))
    assert ds[(2, 4, True)].shape == (3, 4, 4)
    ds.close()
    report = verify_lmdb(path)
    assert report.ok and report.counts == {4: 5, 8: 5, 16: 5, 32: 5}


def test_wrong_input_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        ["folder", tmp_path / "missing", "--out", tmp_path / "o", "--max-res", 32],
        ["folder", tmp_path / "empty", "--out", tmp_path / "o", "--max-res", 32],
        ["demo", "--out", tmp_path / "o", "--max-res", 48],
        ["demo", "--out", tmp_path / "o", "--count", 10, "--holdout", 10],
        ["verify", tmp_path / "missing"],
    ]
    for args in cases:
        p = _cli(*args, check=False)
        assert p.exit_code != 0, args
        assert isinstance(p.exception, SystemExit), p.exception  # click's error, not a crash
        assert len([ln for ln in p.output.splitlines() if ln.startswith("Error:")]) == 1, p.output


def test_celebahq_subset_warns_but_succeeds(tmp_path):
    src = tmp_path / "CelebA-HQ-img"
    src.mkdir()
    for i in (0, 1, 2, 10):
        Image.fromarray(np.full((64, 64, 3), i * 20, np.uint8)).save(src / f"{i}.jpg", quality=95)
    p = _cli("celebahq", src, "--out", tmp_path / "hq.lmdb", "--max-res", 32)
    assert "found 4 images, CelebA-HQ has 30000" in p.output
    assert "is 64x64" in p.output
    ds = MultiResolutionDataset(tmp_path / "hq.lmdb", "all")
    # Natural order: 10.jpg is the last image, not the second.
    assert abs(int(ds[(3, 8, False)].float().mean()) - 200) <= 2
    ds.close()
