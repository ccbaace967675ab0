"""Signal metrics for comparing a reconstruction with its reference (numpy; float64 inside)."""
from __future__ import annotations

import numpy as np


def si_snr_db(reference: np.ndarray, estimate: np.ndarray, eps: float = 1e-12) -> float:
    """Scale-invariant signal-to-noise ratio in dB of `estimate` against `reference` (both [samples]).

    Both are made zero-mean; the reference is projected onto, s = <x̂, x> x / |x|^2, and
    SI-SNR = 10 log10(|s|^2 / |x̂ - s|^2). Any non-zero gain on the estimate leaves it unchanged.
    """
    reference = np.asarray(reference, np.float64)
    estimate = np.asarray(estimate, np.float64)
    if reference.shape != estimate.shape or reference.ndim != 1:
        raise ValueError(f"si_snr_db needs two [samples] arrays of one length, got {reference.shape} and "
                         f"{estimate.shape}")
    reference = reference - reference.mean()
    estimate = estimate - estimate.mean()
    target = np.dot(estimate, reference) / (np.dot(reference, reference) + eps) * reference
    noise = estimate - target
    return float(10.0 * np.log10((np.dot(target, target) + eps) / (np.dot(noise, noise) + eps)))
