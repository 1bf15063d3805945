"""Real photographs for the quality study: crops of the photos bundled with scikit-image.

    python bench/photo_patches.py --out data/photos32.lmdb --res 32 --count 4000

Cuts ``--count`` random square crops (side 12-30% of the photo's shorter side, so that the
crops show objects and textures at several scales) out of seven colour photographs that
scikit-image ships inside its package (no download), writes them as PNGs into a temporary
folder and turns that folder into a multi-resolution LMDB with ``tools/prepare_lmdb.py
folder`` (``--holdout`` of them held out as the test split). Needs ``pip install
scikit-image`` (a bench-only dependency: the library never imports it).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina")  # colour photographs inside the scikit-image wheel


def photo_crops(count: int, res: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` random res×res uint8 crops (H×W×3), photos drawn in turn."""
    try:
        import skimage.data
    except ImportError:
        raise click.ClickException("needs scikit-image: pip install scikit-image") from None
    photos = [np.asarray(getattr(skimage.data, name)())[..., :3] for name in PHOTOS]
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.12, 0.30))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((res, res), Image.BOX)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crops.append(np.asarray(crop))
    return crops


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(), required=True, help="The LMDB to write.")
@click.option("--res", type=int, default=32, show_default=True, help="Crop size (a power of two).")
@click.option("--count", type=int, default=4000, show_default=True, help="Crops in all.")
@click.option("--holdout", type=int, default=512, show_default=True, help="Crops held out (test split).")
@click.option("--seed", type=int, default=0, show_default=True)
def main(out: str, res: int, count: int, holdout: int, seed: int) -> None:
    """Crops of scikit-image's bundled photographs as a multi-resolution LMDB."""
    with tempfile.TemporaryDirectory() as tmp:
        for i, crop in enumerate(photo_crops(count, res, seed)):
            Image.fromarray(crop).save(Path(tmp) / f"{i:06d}.png")
        tool = Path(__file__).resolve().parents[1] / "tools" / "prepare_lmdb.py"
        subprocess.run([sys.executable, str(tool), "folder", tmp, "--out", out, "--max-res", str(res),
                        "--holdout", str(holdout), "--workers", "1", "--overwrite"], check=True)


if __name__ == "__main__":
    main()
