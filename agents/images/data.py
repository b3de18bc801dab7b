"""Image datasets for the image generator, as float tensors in [-1, 1] shaped (N, C, H, W).

Sources (none downloads anything):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 grayscale images, pixel values 0..16,
  10 classes). The embedded default.
- ``folder``: a folder of PNG/JPEG images of any size, resized to ``image_size``. Class labels come from
  first-level subfolder names (the torchvision ``ImageFolder`` layout); images directly in the folder form a
  single class.
- ``cifar10``: the official CIFAR-10 "python version" batches (``data_batch_1`` .. ``data_batch_5``) from a
  folder the user names. Those files are Python pickles because that is the dataset's published format; we
  unpickle them with ``pickle`` for that reason only, only from the user's path, and check the result's
  structure. Never point this loader at files you do not trust: unpickling can run code.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DATASETS = ("digits", "folder", "cifar10")


@dataclass
class ImageData:
    """A labelled image set.

    Attributes:
        images: (N, C, H, W) float32 in [-1, 1].
        labels: (N,) int64 class indices in [0, num_classes).
        num_classes: number of classes (1 for an unlabelled folder).
        name: short identifier, used to key caches (e.g. ``digits``, ``folder-<hash>``).
        class_names: one name per class.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    class_names: list[str]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def fingerprint(self) -> str:
        """A short hash of the pixels and labels, so caches keyed by it never mix datasets."""
        h = hashlib.sha1()
        h.update(str(tuple(self.images.shape)).encode())
        h.update(self.images.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()[:12]


def normalize(pixels: np.ndarray | torch.Tensor, max_value: float) -> torch.Tensor:
    """Map pixel values in [0, max_value] to float32 in [-1, 1] (same shape)."""
    if max_value <= 0:
        raise ValueError(f"normalize: max_value must be positive, got {max_value}")
    x = torch.as_tensor(np.asarray(pixels), dtype=torch.float32)
    return x / (max_value / 2.0) - 1.0


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Map images in [-1, 1] back to [0, 1] (clamped; generated samples may overshoot). Same shape."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 in 0..255."""
    x = denormalize(images.detach().float().cpu())
    return (x * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _resize(images: torch.Tensor, image_size: int | None) -> torch.Tensor:
    if image_size is None or tuple(images.shape[-2:]) == (image_size, image_size):
        return images
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False,
                         antialias=True).clamp(-1.0, 1.0)


def load_digits(image_size: int | None = None) -> ImageData:
    """scikit-learn's bundled digits: (1797, 1, 8, 8) in [-1, 1] (values 0..16 scaled), 10 classes."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = normalize(bunch.images[:, None], 16.0)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    name = "digits" if image_size in (None, 8) else f"digits{image_size}"
    return ImageData(_resize(images, image_size), labels, 10, name, [str(i) for i in range(10)])


def load_image_folder(path: str | Path, image_size: int, channels: int = 3) -> ImageData:
    """PNG/JPEG files under ``path`` (any size), resized to ``image_size`` x ``image_size``.

    Files in first-level subfolders are labelled by the subfolder (sorted names -> 0, 1, ...); files directly
    in ``path`` form one class when there are no subfolders. ``channels``: 1 (grayscale) or 3 (RGB).
    Returns images (N, channels, image_size, image_size) in [-1, 1].
    """
    from PIL import Image

    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")

    def images_in(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and images_in(d))
    if class_dirs:
        files = [(p, i) for i, d in enumerate(class_dirs) for p in images_in(d)]
        class_names = [d.name for d in class_dirs]
    else:
        files = [(p, 0) for p in images_in(root)]
        class_names = [root.name]
    if not files:
        raise ValueError(f"no {'/'.join(IMAGE_SUFFIXES)} images found in {str(root)!r} or its subfolders")

    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for p, _ in files:
        try:
            with Image.open(p) as im:
                im = im.convert(mode).resize((image_size, image_size), Image.Resampling.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.uint8).reshape(image_size, image_size, channels))
        except OSError as e:
            raise ValueError(f"cannot read image {str(p)!r}: {e}") from e
    images = normalize(np.stack(arrays).transpose(0, 3, 1, 2), 255.0)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:8]
    return ImageData(images, labels, len(class_names), f"folder-{digest}-{image_size}", class_names)


def load_cifar10(path: str | Path, image_size: int | None = None) -> ImageData:
    """CIFAR-10 training batches (``data_batch_1`` .. ``data_batch_5``) from the user's folder.

    Returns images (N, 3, 32, 32) in [-1, 1] (or resized to ``image_size``) and their 10 labels. The batch
    files are pickles (the dataset's official format); see the module docstring before using untrusted files.
    """
    root = Path(path).expanduser()
    files = sorted(root.glob("data_batch_*"))
    if not files:
        raise FileNotFoundError(
            f"no CIFAR-10 'data_batch_*' files in {str(root)!r}; give the folder of the python-version batches "
            "(cifar-10-batches-py); nothing is downloaded"
        )
    data, labels = [], []
    for f in files:
        with open(f, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")  # the dataset's own format; user-named path only
        if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
            raise ValueError(f"{str(f)!r} is not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
        arr = np.asarray(batch[b"data"], dtype=np.uint8)
        if arr.ndim != 2 or arr.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{str(f)!r}: data has shape {arr.shape}, expected (n, 3072)")
        data.append(arr.reshape(-1, 3, 32, 32))
        labels.extend(int(v) for v in batch[b"labels"])
    images = normalize(np.concatenate(data), 255.0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    size = 32 if image_size is None else image_size
    return ImageData(_resize(images, image_size), torch.tensor(labels, dtype=torch.int64), 10, f"cifar10-{size}",
                     names)


def load_dataset(dataset: str, path: str | Path | None = None, image_size: int | None = None,
                 channels: int = 3) -> ImageData:
    """Load by name: ``digits`` (default, embedded), ``folder`` (needs ``path``) or ``cifar10`` (needs ``path``)."""
    if dataset == "digits":
        return load_digits(image_size)
    if dataset in ("folder", "cifar10") and not path:
        raise ValueError(f"dataset {dataset!r} needs a path (task.path=...); nothing is downloaded")
    if dataset == "folder":
        return load_image_folder(path, image_size or 32, channels)
    if dataset == "cifar10":
        return load_cifar10(path, image_size)
    raise ValueError(f"unknown image dataset {dataset!r}; choose from {DATASETS}")
