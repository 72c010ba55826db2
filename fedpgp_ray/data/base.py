"""The dataset interface every dataset (procedural world, CoOp folders, CIFAR) returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image


class DataError(ValueError):
    """A dataset root, split file or image is missing or unreadable."""


@dataclass(frozen=True)
class ImageSplit:
    """The images of one split with their labels.

    images: an in-memory uint8 array [n, H, W, 3] or a list of image file paths.
    labels: int64 [n], indices into the dataset's `classnames`.
    domains: int64 [n] domain index per image (domain-level datasets), else None.
    """
    images: np.ndarray | list[str]
    labels: np.ndarray
    domains: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DataError(f"split has {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> Image.Image:
        item = self.images[i]
        if isinstance(item, np.ndarray):
            return Image.fromarray(item)
        try:
            with Image.open(item) as img:
                return img.convert("RGB")
        except (OSError, SyntaxError) as err:
            raise DataError(f"unreadable image {item}: {err} (replace or delete the file, "
                            f"or set data.skip_bad_images: true)") from None


@dataclass(frozen=True)
class ClassificationDataset:
    """A labelled image dataset.

    name: identity used in cache keys; must change whenever the images change
        (e.g. include the generator seed and sizes).
    classnames: label i -> classnames[i]; sorted and deterministic, never from a set.
    domains: domain names for domain-level datasets (ImageSplit.domains indexes them).
    """
    name: str
    classnames: list[str]
    train: ImageSplit
    test: ImageSplit
    domains: list[str] = field(default_factory=list)


DatasetBuilder = Callable[..., ClassificationDataset]
DATASETS: dict[str, DatasetBuilder] = {}


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Register `builder(data_cfg: DataConfig, seed: int) -> ClassificationDataset` under `name`."""
    def wrap(builder: DatasetBuilder) -> DatasetBuilder:
        DATASETS[name] = builder
        return builder
    return wrap
