"""PSNR, SSIM (against hand-built cases and an independent numpy reference) and the Fréchet distance."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from tokenizer.image_metrics import frechet_distance, frechet_distance_from_statistics, psnr, ssim


def _images(seed: int, shape=(2, 3, 32, 32)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.random(shape)
    b = np.clip(a + 0.15 * rng.standard_normal(shape), 0.0, 1.0)
    return a, b


def test_psnr_known_values_and_declared_range():
    a = torch.full((2, 3, 8, 8), 0.3)
    b = a + 0.1
    assert psnr(a, b) == pytest.approx(torch.tensor([20.0, 20.0], dtype=torch.float64))
    # The same pictures stored in [-1, 1] give the same PSNR when the range is declared.
    assert psnr(a * 2 - 1, b * 2 - 1, value_range=(-1.0, 1.0)) == pytest.approx(psnr(a, b))
    assert torch.isinf(psnr(a, a)).all()
    half = a.clone()
    half[1] += 0.2
    assert psnr(a, half).tolist() == pytest.approx([math.inf, 10 * math.log10(1 / 0.04)])


def test_psnr_and_ssim_input_errors():
    a = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="outside the declared value_range"):
        psnr(a * 2 - 1, a)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, a[:, :, :8])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ssim(a[0], a[0])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:, :, :10], a[:, :, :10])


def test_ssim_identical_images_is_one():
    a, _ = _images(0)
    assert ssim(a, a) == pytest.approx(torch.ones(2, dtype=torch.float64), abs=1e-12)


def test_ssim_constant_images_closed_form():
    # Zero variances and covariance: SSIM reduces to the luminance term (2 c1 c2 + C1) / (c1^2 + c2^2 + C1).
    c1, c2, const1 = 0.2, 0.6, 0.01**2
    a = np.full((1, 3, 16, 20), c1)
    b = np.full((1, 3, 16, 20), c2)
    expected = (2 * c1 * c2 + const1) / (c1**2 + c2**2 + const1)
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-12)


def _reference_ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM from the formula, filtered as scikit-image does it: full Gaussian filter, then crop the borders."""
    sigma, truncate, pad = 1.5, 3.5, 5
    c1, c2 = 0.01**2, 0.03**2
    results = []
    for x_img, y_img in zip(a, b):
        channel_scores = []
        for x, y in zip(x_img, y_img):

            def blur(z):
                return ndimage.gaussian_filter(z, sigma=sigma, truncate=truncate, mode="reflect")

            ux, uy = blur(x), blur(y)
            vx = blur(x * x) - ux * ux
            vy = blur(y * y) - uy * uy
            vxy = blur(x * y) - ux * uy
            s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
            channel_scores.append(s[pad:-pad, pad:-pad].mean())
        results.append(np.mean(channel_scores))
    return np.array(results)


def test_ssim_matches_a_numpy_reference():
    a, b = _images(1, shape=(3, 3, 24, 30))
    ours = ssim(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(ours, _reference_ssim(a, b), rtol=0, atol=1e-10)
    assert np.all(ours < 0.99)  # the noise is visible to the metric
    # Declaring [-1, 1] for the same pictures stored in [-1, 1] gives the same values.
    np.testing.assert_allclose(ssim(a * 2 - 1, b * 2 - 1, value_range=(-1, 1)).numpy(), ours, atol=1e-12)


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="scikit-image is not installed")
def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    a, b = _images(2)
    expected = [
        structural_similarity(
            x,
            y,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=0,
        )
        for x, y in zip(a, b)
    ]
    np.testing.assert_allclose(ssim(a, b).numpy(), expected, atol=1e-8)


def test_frechet_distance_identical_and_shifted_sets():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((300, 8)) @ rng.standard_normal((8, 8))
    assert abs(frechet_distance(feats, feats)) < 1e-6
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 0.0, 0.0, 1.0])
    assert frechet_distance(feats, feats + shift) == pytest.approx(float(shift @ shift), abs=1e-6)
    assert frechet_distance(torch.from_numpy(feats), torch.from_numpy(feats + shift)) == pytest.approx(
        float(shift @ shift), abs=1e-6
    )


def test_frechet_distance_known_gaussians():
    # Commuting covariances Q diag(a) Q^T and Q diag(b) Q^T: the trace term is sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    eig_a = np.array([1.0, 2.0, 0.5, 4.0, 3.0])
    eig_b = np.array([2.0, 2.0, 1.5, 1.0, 0.25])
    mu_a, mu_b = rng.standard_normal(5), rng.standard_normal(5)
    value = frechet_distance_from_statistics(mu_a, q @ np.diag(eig_a) @ q.T, mu_b, q @ np.diag(eig_b) @ q.T)
    expected = float((mu_a - mu_b) @ (mu_a - mu_b) + np.sum((np.sqrt(eig_a) - np.sqrt(eig_b)) ** 2))
    assert value == pytest.approx(expected, rel=1e-9)
    # Samples: N(0, I) against N(m, 4 I) in 4-D -> |m|^2 + 4 * (2 - 1)^2.
    m = np.array([1.0, 0.0, -1.0, 2.0])
    x = rng.standard_normal((20000, 4))
    y = m + 2.0 * rng.standard_normal((20000, 4))
    assert frechet_distance(x, y) == pytest.approx(float(m @ m) + 4.0, rel=0.05)


def test_frechet_distance_singular_covariances_stay_finite():
    rng = np.random.default_rng(2)
    # Fewer samples than dimensions: both covariances are singular.
    a = rng.standard_normal((4, 16))
    b = rng.standard_normal((4, 16)) + 1.0
    value = frechet_distance(a, b)
    assert math.isfinite(value) and value > 16 * 0.5


def test_frechet_distance_input_errors():
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="differ in dimension"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet_distance(np.zeros(5), np.zeros(5))
