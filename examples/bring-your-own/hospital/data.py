"""How a hospital reads its own images: ``<root>/<split>/<label>/*.png``.

The transform is public, fixed code (grey-scale, optional resize, pixel / 255): it uses no
statistic of the hospital's images, so it reveals nothing about them and needs no privacy
budget. privfl calls :func:`load_site` in the hospital's own process and never sees a file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

SPLITS = ("train", "test")


def to_tensor(image: Image.Image, image_size: int = 8) -> torch.Tensor:
    """The public transform: 8-bit grey-scale, resized to ``image_size`` if needed, to a
    ``(1, image_size, image_size)`` float32 tensor in [0, 1]."""
    image = image.convert("L")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).unsqueeze(0)


class HospitalImages(Dataset):
    """A map-style Dataset over ``<root>/<split>/<label>/*.png`` yielding ``(tensor, int label)``.

    Labels are the folder names (integers); files are read in sorted order, so the index of
    an image is the same on every run. Images are decoded on access, as torchvision's
    ``ImageFolder`` does.
    """

    def __init__(self, root: str | Path, split: str = "train",
                 transform: Callable[[Image.Image], torch.Tensor] | None = None, image_size: int = 8) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.transform = transform or partial(to_tensor, image_size=image_size)
        folder = self.root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"no {split} folder in {self.root} (expected {folder}/<label>/*.png; "
                                    "run make_images.py first)")
        samples: list[tuple[Path, int]] = []
        for label_dir in sorted((d for d in folder.iterdir() if d.is_dir()), key=lambda d: d.name):
            if not label_dir.name.isdigit():
                raise ValueError(f"{label_dir}: label folders must be named by their integer label")
            label = int(label_dir.name)
            samples += [(f, label) for f in sorted(label_dir.glob("*.png"))]
        if not samples:
            raise FileNotFoundError(f"no images under {folder}/<label>/*.png")
        self.samples = samples
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            x = self.transform(image)
        return x, label


def load_site(site_index: int, num_sites: int, root: str, hospitals: Sequence[str] | None = None,
              image_size: int = 8) -> tuple[HospitalImages, HospitalImages]:
    """``[data] factory = "hospital.data:load_site"``: this site's ``(train, test)`` datasets.

    ``root`` is this hospital's own folder (``privfl launch``, one ``[nodes.<id>.data].root``
    per hospital), or, with ``hospitals`` (a list of folder names, one per site), the folder
    holding every hospital's folder; site ``site_index`` then reads ``root/hospitals[site_index]``
    (``privfl compare``, which simulates all sites on one machine).
    """
    base = Path(root)
    if hospitals is not None:
        if len(hospitals) != num_sites:
            raise ValueError(f"hospitals lists {len(hospitals)} folders for {num_sites} sites")
        base = base / hospitals[site_index]
    return (HospitalImages(base, "train", image_size=image_size),
            HospitalImages(base, "test", image_size=image_size))
