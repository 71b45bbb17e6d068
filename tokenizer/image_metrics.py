"""Image reconstruction metrics: PSNR, SSIM and the Fréchet distance between two sets of features.

`psnr` and `ssim` take batches shaped (N, C, H, W), torch tensors or numpy arrays, whose values lie in a
declared `value_range` (default (0, 1); pass (-1, 1) for images in [-1, 1]). Both images are mapped to [0, 1]
first, so the data range is 1 and the results equal those of scikit-image / pytorch_msssim on the [0, 1]
images. Both return one value per image as a float64 torch tensor of shape (N,).

SSIM uses the standard setting of Wang et al. (2004) as scikit-image (`gaussian_weights=True, sigma=1.5,
use_sample_covariance=False`) and pytorch_msssim compute it: an 11x11 Gaussian window with sigma 1.5 applied
as a "valid" separable filter, K1 = 0.01, K2 = 0.03, population (co)variances, the SSIM map averaged over the
valid positions, then over the channels.

`frechet_distance` follows pytorch-fid's `calculate_frechet_distance`: unbiased covariances, scipy.linalg.sqrtm
of the covariance product, an eps * I offset on both covariances when that root is not finite, and the
imaginary residue dropped when it is numerically zero (an error otherwise).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

SSIM_WINDOW_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
RANGE_TOLERANCE = 1e-4


def _as_unit_batch(
    images: torch.Tensor | np.ndarray, value_range: tuple[float, float], name: str
) -> torch.Tensor:
    """Validate an (N, C, H, W) batch in `value_range` and map it to float64 values in [0, 1]."""
    tensor = torch.as_tensor(images).detach().to(device="cpu", dtype=torch.float64)
    if tensor.ndim != 4:
        raise ValueError(f"{name} must be a batch shaped (N, C, H, W), got shape {tuple(tensor.shape)}")
    low, high = float(value_range[0]), float(value_range[1])
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    span = high - low
    if tensor.numel() and (
        tensor.min() < low - RANGE_TOLERANCE * span or tensor.max() > high + RANGE_TOLERANCE * span
    ):
        raise ValueError(
            f"{name} has values in [{tensor.min().item():.4g}, {tensor.max().item():.4g}], outside the declared "
            f"value_range {value_range}; clamp the images or declare the right range"
        )
    return (tensor - low) / span


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def psnr(
    a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, 10 log10(1 / MSE) on [0, 1] images (inf where identical)."""
    x = _as_unit_batch(a, value_range, "a")
    y = _as_unit_batch(b, value_range, "b")
    _check_pair(x, y)
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse)


def gaussian_window(size: int = SSIM_WINDOW_SIZE, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalized 1-D Gaussian taps (float64), centred, of odd length `size`."""
    if size % 2 != 1:
        raise ValueError(f"window size must be odd, got {size}")
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-(offsets**2) / (2 * sigma**2))
    return taps / taps.sum()


def _valid_gaussian_filter(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    channels = x.shape[1]
    size = taps.numel()
    horizontal = taps.view(1, 1, 1, size).expand(channels, 1, 1, size)
    vertical = taps.view(1, 1, size, 1).expand(channels, 1, size, 1)
    return F.conv2d(F.conv2d(x, horizontal, groups=channels), vertical, groups=channels)


def ssim(
    a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)
) -> torch.Tensor:
    """Structural similarity per image (11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, mean over channels)."""
    x = _as_unit_batch(a, value_range, "a")
    y = _as_unit_batch(b, value_range, "b")
    _check_pair(x, y)
    height, width = x.shape[-2:]
    if height < SSIM_WINDOW_SIZE or width < SSIM_WINDOW_SIZE:
        raise ValueError(
            f"SSIM needs images of at least {SSIM_WINDOW_SIZE}x{SSIM_WINDOW_SIZE} pixels, got {height}x{width}"
        )
    taps = gaussian_window()
    c1 = SSIM_K1**2
    c2 = SSIM_K2**2
    mu_x = _valid_gaussian_filter(x, taps)
    mu_y = _valid_gaussian_filter(y, taps)
    var_x = _valid_gaussian_filter(x * x, taps) - mu_x * mu_x
    var_y = _valid_gaussian_filter(y * y, taps) - mu_y * mu_y
    cov_xy = _valid_gaussian_filter(x * y, taps) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    per_channel = (numerator / denominator).mean(dim=(-2, -1))
    return per_channel.mean(dim=1)


def feature_statistics(
    features: torch.Tensor | np.ndarray, name: str = "features"
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of an (N, D) feature matrix, N >= 2."""
    if isinstance(features, torch.Tensor):
        features = features.detach().to(device="cpu", dtype=torch.float64).numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be shaped (N, D), got shape {array.shape}")
    if array.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples for a covariance, got {array.shape[0]}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return array.mean(axis=0), np.atleast_2d(np.cov(array, rowvar=False))


def frechet_distance_from_statistics(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) for two Gaussians given by mean and covariance."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(
            f"covariances must both be ({mu1.shape[0]}, {mu1.shape[0]}), got {sigma1.shape} and {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"Fréchet distance: singular product of covariances; adding {eps} to the diagonal of both",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            largest = float(np.max(np.abs(covmean.imag)))
            raise ValueError(f"Fréchet distance: matrix square root has an imaginary component {largest:.3g}")
        covmean = covmean.real
    distance = float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
    if not math.isfinite(distance):
        raise ValueError("Fréchet distance is not finite: check the features for degenerate values")
    return distance


def frechet_distance(
    feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (the FID formula)."""
    mu1, sigma1 = feature_statistics(feats_a, "feats_a")
    mu2, sigma2 = feature_statistics(feats_b, "feats_b")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature sets differ in dimension: {mu1.shape[0]} vs {mu2.shape[0]}")
    return frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2, eps=eps)
