"""Write three hospitals' image folders from scikit-learn's 8×8 digits (nothing is downloaded).

    python make_images.py                 # -> images/<hospital>/<split>/<label>/<n>.png

Each hospital sees every digit, but mostly "its own" ones (a label skew, as real sites
differ): digit d goes 60 % to hospital d mod 3 and 20 % to each of the others; within a
hospital 20 % of each digit is held out as its test split. Deterministic: the same seed
writes byte-identical files (a legacy NumPy RandomState, whose stream NumPy keeps stable).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

HOSPITALS = ("st-mary", "general", "childrens")
HERE = Path(__file__).resolve().parent


def split_indices(labels: np.ndarray, num_hospitals: int, seed: int = 0, home_share: float = 0.6,
                  test_fraction: float = 0.2) -> list[dict[str, list[int]]]:
    """For each hospital, ``{"train": [...], "test": [...]}`` indices into the digits set.

    Digit ``d``'s images (shuffled with ``seed``) go ``home_share`` to hospital ``d % n`` and
    the rest in equal parts to the others; each hospital keeps ``test_fraction`` of each of
    its digits (at least one image) for testing.
    """
    rng = np.random.RandomState(seed)
    out: list[dict[str, list[int]]] = [{"train": [], "test": []} for _ in range(num_hospitals)]
    other = (1.0 - home_share) / max(1, num_hospitals - 1)
    for digit in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        home = int(digit) % num_hospitals
        shares = np.array([home_share if h == home else other for h in range(num_hospitals)])
        cuts = np.round(np.cumsum(shares) * len(idx)).astype(int)[:-1]
        for h, part in enumerate(np.split(idx, cuts)):
            n_test = max(1, int(round(test_fraction * len(part)))) if len(part) > 1 else 0
            out[h]["test"] += sorted(int(i) for i in part[:n_test])
            out[h]["train"] += sorted(int(i) for i in part[n_test:])
    return out


def to_png_pixels(image: np.ndarray) -> np.ndarray:
    """scikit-learn's 0..16 intensities as 8-bit grey levels (16 -> 255)."""
    return np.round(np.asarray(image, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)


def make_images(out: str | Path = HERE / "images", hospitals: tuple[str, ...] | list[str] = HOSPITALS,
                seed: int = 0, home_share: float = 0.6, test_fraction: float = 0.2) -> dict[str, dict[str, int]]:
    """Write ``out/<hospital>/<split>/<label>/<index>.png`` for every hospital; returns the
    image counts ``{hospital: {"train": n, "test": m}}``. Each hospital's ``train`` and ``test``
    folders are replaced, nothing else under ``out`` is touched."""
    digits = load_digits()
    images, labels = digits.images, digits.target
    out = Path(out)
    counts: dict[str, dict[str, int]] = {}
    for name, parts in zip(hospitals, split_indices(labels, len(hospitals), seed, home_share, test_fraction)):
        counts[name] = {}
        for split, idx in parts.items():
            folder = out / name / split
            if folder.exists():
                shutil.rmtree(folder)
            for i in idx:
                d = folder / str(int(labels[i]))
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(to_png_pixels(images[i])).save(d / f"{i:04d}.png", format="PNG")
            counts[name][split] = len(idx)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "images"), help="output folder (default: images/ here)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    args = parser.parse_args(argv)
    counts = make_images(args.out, seed=args.seed)
    for name, c in counts.items():
        print(f"{name}: {c['train']} train, {c['test']} test images in {Path(args.out) / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
