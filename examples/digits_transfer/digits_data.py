"""The data of the digits study: scikit-learn's 8x8 digits, pretraining on 0-4, few-shot transfer to 5-9."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader


PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
TRANSFER_CLASSES = (5, 6, 7, 8, 9)


def load_digit_tensors(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scikit-learn digits as `[N, 1, S, S]` pixels in [-1, 1] (background -1) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return pixels * 2.0 - 1.0, torch.tensor(digits.target, dtype=torch.long)


def random_affine(pixel_values: torch.Tensor, rotate_deg: float = 12.0, scale: float = 0.1, shift: float = 0.12):
    """Small random rotation, zoom and shift per image; the uncovered border gets the background value -1."""
    n = pixel_values.shape[0]
    device = pixel_values.device
    angle = (torch.rand(n, device=device) * 2 - 1) * math.radians(rotate_deg)
    zoom = 1 + (torch.rand(n, device=device) * 2 - 1) * scale
    offset = (torch.rand(n, 2, device=device) * 2 - 1) * shift
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(pixel_values.dtype), list(pixel_values.shape), align_corners=False)
    return F.grid_sample(pixel_values + 1, grid, align_corners=False, padding_mode="zeros") - 1


def tensor_collate(batch):
    pixel_values, labels = zip(*batch)
    return {"pixel_values": torch.stack(pixel_values), "labels": torch.stack(labels)}


def digits_loader(dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A loader of `{"pixel_values", "labels"}` batches; a shuffled one draws its order from `seed` only."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=tensor_collate)


def pretrain_split(labels: torch.Tensor, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the 0-4 digits: 80% to pretrain on, 20% held out (stratified, fixed by `seed`)."""
    from sklearn.model_selection import train_test_split

    indices = np.flatnonzero(np.isin(labels.numpy(), PRETRAIN_CLASSES))
    train, held_out = train_test_split(indices, test_size=0.2, stratify=labels.numpy()[indices], random_state=seed)
    return np.sort(train), np.sort(held_out)


def few_shot_split(labels: torch.Tensor, shots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`shots` random training images per class of 5-9; every other 5-9 digit is the test set."""
    rng = np.random.default_rng(seed)
    labels = labels.numpy()
    train = []
    for cls in TRANSFER_CLASSES:
        members = np.flatnonzero(labels == cls)
        if shots >= len(members):
            raise ValueError(f"--shots {shots} leaves no test images of class {cls} ({len(members)} images).")
        train.extend(rng.choice(members, size=shots, replace=False).tolist())
    train = np.sort(np.array(train))
    test = np.setdiff1d(np.flatnonzero(np.isin(labels, TRANSFER_CLASSES)), train)
    return train, test
