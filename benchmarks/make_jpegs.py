"""An imagefolder of JPEGs at ImageNet-like sizes, for the realistic extract and distill checks.

    python benchmarks/make_jpegs.py OUT [--images 2048] [--classes 10] [--seed 0]

Each image is a random crop of one of scikit-learn's two sample photographs, resized to a random
ImageNet-like size (shorter side 300-500 px, aspect 3:4 to 4:3, as most of ImageNet's images are),
with a little noise so no two files are alike, saved at JPEG quality 90 (ImageNet's files average
about 110 KB at about 400 x 350). Decoding them costs what decoding ImageNet costs; their content
does not matter to throughput.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def make(out: Path, images: int, classes: int, seed: int) -> None:
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (out / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(rng.integers(w // 3, w)), int(rng.integers(h // 3, h))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        short = int(rng.integers(300, 501))
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        size = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
        img = photo.crop((left, top, left + cw, top + ch)).resize(size, Image.BILINEAR)
        a = np.asarray(img, dtype=np.int16) + rng.integers(-6, 7, (size[1], size[0], 1), dtype=np.int16)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(
            out / f"class_{i % classes:03d}" / f"img_{i:06d}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    make(Path(a.out), a.images, a.classes, a.seed)
    files = sorted(Path(a.out).rglob("*.jpg"))
    mean_kb = np.mean([f.stat().st_size for f in files]) / 1024
    print(f"{len(files)} JPEGs in {a.out}, {a.classes} classes, {mean_kb:.0f} KB on average")


if __name__ == "__main__":
    main()
