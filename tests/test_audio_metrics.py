"""Signal metrics against hand computations."""
import numpy as np
import pytest

from musiclm_jax.evaluation.audio_metrics import si_snr_db


def test_si_snr_of_a_known_noise_level_and_its_invariances():
    rng = np.random.RandomState(0)
    x = rng.randn(8000)
    x -= x.mean()
    n = rng.randn(8000)
    n -= n.mean()
    n -= np.dot(n, x) / np.dot(x, x) * x  # orthogonal to the reference
    n *= np.sqrt(np.dot(x, x) / np.dot(n, n) / 100.0)  # 1 % of its energy: 20 dB
    assert si_snr_db(x, x + n) == pytest.approx(20.0, abs=1e-9)
    assert si_snr_db(x, -3.0 * (x + n) + 0.5) == pytest.approx(20.0, abs=1e-9)  # gain, sign and offset
    assert si_snr_db(x, x) > 100
    with pytest.raises(ValueError, match="one length"):
        si_snr_db(x, x[:-1])
