"""Generation metrics against independent references (scipy.linalg.sqrtm, scipy.stats.entropy, hand computations)."""
import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats

from musiclm_jax.evaluation.generation_metrics import (Classifier, embedding_statistics, frechet_audio_distance,
                                                       frechet_distance, kl_divergence, kld_from_audio,
                                                       memorization, mulan_cycle_consistency,
                                                       normalized_hamming_distance)

FD_RTOL = 1e-6  # relative agreement of frechet_distance with the scipy.linalg.sqrtm formula


def scipy_covariance_term(sigma1, sigma2) -> float:
    """tr(s1 + s2 - 2 sqrtm(s1 s2)) with scipy's sqrtm (the usual FID/FAD reference code)."""
    covmean = np.real(scipy.linalg.sqrtm(sigma1 @ sigma2))  # round-off can leave a tiny imaginary part
    return float(np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def scipy_frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The reference: ||mu1 - mu2||^2 + tr(s1 + s2 - 2 sqrtm(s1 s2))."""
    diff = np.asarray(mu1) - np.asarray(mu2)
    return float(diff @ diff) + scipy_covariance_term(sigma1, sigma2)


def random_spd(rng, d, rank=None, jitter=1e-3):
    """A random symmetric positive definite [d, d] matrix; rank < d with a tiny jitter gives a nearly singular one."""
    a = rng.randn(d, rank or d) / np.sqrt(d)
    return a @ a.T + jitter * np.eye(d)


@pytest.mark.parametrize("d", [1, 2, 7, 32, 128])
def test_frechet_distance_matches_scipy_sqrtm(d):
    rng = np.random.RandomState(d)
    mu1, mu2 = rng.randn(d), rng.randn(d)
    sigma1, sigma2 = random_spd(rng, d), random_spd(rng, d)
    expected_cov = scipy_covariance_term(sigma1, sigma2)  # one sqrtm per case: it takes ~1 s at d = 128
    # Covariance term alone (equal means), which is the part the matrix square root decides, then the total.
    assert frechet_distance(mu1, sigma1, mu1, sigma2) == pytest.approx(expected_cov, rel=FD_RTOL)
    expected = float((mu1 - mu2) @ (mu1 - mu2)) + expected_cov
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=FD_RTOL)


@pytest.mark.parametrize("d", [16, 128])
def test_frechet_distance_with_a_nearly_singular_covariance_matches_scipy(d):
    rng = np.random.RandomState(100 + d)
    mu1, mu2 = rng.randn(d), rng.randn(d)
    sigma1 = random_spd(rng, d, rank=d // 4, jitter=1e-9)  # condition number ~1e9
    sigma2 = random_spd(rng, d)
    assert np.linalg.cond(sigma1) > 1e7
    expected_cov = scipy_covariance_term(sigma1, sigma2)
    assert frechet_distance(mu1, sigma1, mu1, sigma2) == pytest.approx(expected_cov, rel=FD_RTOL)
    assert frechet_distance(mu2, sigma2, mu2, sigma1) == pytest.approx(expected_cov, rel=FD_RTOL)  # singular first
    expected = float((mu1 - mu2) @ (mu1 - mu2)) + expected_cov
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=FD_RTOL)


def test_frechet_distance_closed_form_for_diagonal_covariances():
    # Diagonal covariances commute: d^2 = ||mu1 - mu2||^2 + sum_i (sqrt(v1_i) - sqrt(v2_i))^2.
    rng = np.random.RandomState(1)
    d = 50
    mu1, mu2 = rng.randn(d), rng.randn(d)
    v1, v2 = rng.uniform(0.01, 3.0, d), rng.uniform(0.01, 3.0, d)
    v1[:5] = 0.0  # singular (PSD) is allowed
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-12)


def test_frechet_distance_is_zero_for_identical_statistics_and_symmetric():
    rng = np.random.RandomState(2)
    for d in (3, 64, 128):
        mu, sigma = rng.randn(d), random_spd(rng, d)
        assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9 * np.trace(sigma))
        mu2, sigma2 = rng.randn(d), random_spd(rng, d, rank=d // 2, jitter=1e-8)
        assert frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(frechet_distance(mu2, sigma2, mu, sigma),
                                                                         rel=1e-9)
        assert frechet_distance(mu, sigma, mu2, sigma2) > 0


def test_embedding_statistics_match_numpy():
    rng = np.random.RandomState(3)
    x = rng.randn(40, 6)
    mu, sigma = embedding_statistics(x)
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-12, atol=1e-15)
    mu, sigma = embedding_statistics(x[:, :1])
    assert mu.shape == (1,) and sigma.shape == (1, 1)


def test_frechet_audio_distance_of_samples():
    rng = np.random.RandomState(4)
    d, n = 8, 20000
    a = rng.randn(d, d) / np.sqrt(d)
    mean = rng.randn(d)

    def draw(shift=0.0):
        return mean + shift + rng.randn(n, d) @ a.T

    same = frechet_audio_distance(draw(), draw())
    assert 0 <= same < 0.02  # finite-sample bias only
    shift = np.zeros(d)
    shift[:4] = 1.0  # ||shift||^2 = 4
    shifted = frechet_audio_distance(draw(), draw(shift))
    assert shifted == pytest.approx(4.0, abs=0.15)
    # Same as going through the statistics by hand.
    x, y = draw(), draw(shift)
    assert frechet_audio_distance(x, y) == pytest.approx(
        scipy_frechet_distance(*embedding_statistics(x), *embedding_statistics(y)), rel=FD_RTOL)


def test_frechet_errors_name_the_arguments():
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="mu1"):
        frechet_distance(np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="reference_embeddings and generated_embeddings"):
        frechet_audio_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="generated_embeddings needs at least 2 samples"):
        frechet_audio_distance(np.zeros((5, 3)), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="reference_embeddings needs at least 2 samples"):
        frechet_audio_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"reference_embeddings must be \[N, D\]"):
        frechet_audio_distance(np.zeros(5), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="embeddings needs at least 2"):
        embedding_statistics(np.zeros((1, 3)))


# ------------------------------------------------------------------------------------------------- KL divergence

def random_probs(rng, n, c, concentration=1.0):
    return rng.dirichlet(np.full(c, concentration), size=n)


def test_kl_divergence_matches_scipy_entropy():
    rng = np.random.RandomState(5)
    p, q = random_probs(rng, 12, 10), random_probs(rng, 12, 10, concentration=0.3)
    for eps in (0.0, 1e-6, 1e-2):
        expected = np.mean([scipy.stats.entropy(p[i] + eps, q[i] + eps) for i in range(len(p))])
        assert kl_divergence(p, q, eps=eps) == pytest.approx(expected, rel=1e-10)
    assert kl_divergence(p, q) == pytest.approx(
        np.mean([scipy.stats.entropy(p[i] + 1e-6, q[i] + 1e-6) for i in range(len(p))]), rel=1e-10)


def test_kl_divergence_zero_for_identical_positive_otherwise_and_edge_cases():
    rng = np.random.RandomState(6)
    p, q = random_probs(rng, 5, 7), random_probs(rng, 5, 7)
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-15)
    assert kl_divergence(p, q) > 0 and kl_divergence(q, p) > 0
    one_hot = np.eye(3)[[0, 1]]
    assert kl_divergence(one_hot, one_hot, eps=0.0) == 0.0  # 0 log 0 counts 0
    assert kl_divergence(one_hot, one_hot[::-1], eps=0.0) == np.inf
    assert np.isfinite(kl_divergence(one_hot, one_hot[::-1]))  # eps keeps it finite: ~log(1/eps)
    assert kl_divergence(one_hot, one_hot[::-1]) == pytest.approx(np.log(1 / 1e-6), rel=1e-4)
    # Rows are normalised: scaled scores give the same value (exactly so without smoothing).
    assert kl_divergence(3.0 * p, 0.5 * q, eps=0.0) == pytest.approx(kl_divergence(p, q, eps=0.0), rel=1e-12)
    with pytest.raises(ValueError, match="same"):
        kl_divergence(p, q[:, :-1])
    with pytest.raises(ValueError, match="generated_probs must be finite and non-negative"):
        kl_divergence(p, -q)
    with pytest.raises(ValueError, match="eps"):
        kl_divergence(p, q, eps=-1.0)


class MeanBandClassifier:
    """A tiny fake classifier: softmax over the mean of 3 equal chunks of each clip, times 10."""

    def __init__(self):
        self.calls = []

    def __call__(self, audio, sample_rate):
        self.calls.append((audio.shape, sample_rate))
        chunks = np.stack([c.mean(axis=1) for c in np.array_split(audio, 3, axis=1)], axis=1) * 10.0
        e = np.exp(chunks - chunks.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def test_audiocraft_kl_matches_its_torch_formula_on_fixed_posteriors():
    """audiocraft/metrics/kld.py: kl_div((pred + 1e-6).log(), target, reduction='none').sum(-1), averaged over the
    rows, with target the reference posteriors; softmax rows of 527 classes, some reference classes exactly 0."""
    torch = pytest.importorskip("torch")
    from musiclm_jax.evaluation.generation_metrics import audiocraft_kl
    rng = np.random.RandomState(0)
    ref = scipy.special.softmax(3 * rng.randn(6, 527), axis=1)
    gen = scipy.special.softmax(3 * rng.randn(6, 527), axis=1)
    ref[0, :5] = 0.0  # kl_div counts target 0 as 0
    gen[1, :5] = 0.0  # eps keeps log(0) away
    want = torch.nn.functional.kl_div((torch.tensor(gen) + 1e-6).log(), torch.tensor(ref),
                                      reduction="none").sum(-1).mean().item()
    got = audiocraft_kl(ref, gen)
    assert got == pytest.approx(want, rel=1e-12)
    assert got > 1.0  # two unrelated posteriors
    assert -1e-3 < audiocraft_kl(ref, ref) < 0  # the eps on the generated side only: slightly negative
    assert audiocraft_kl(ref, ref) != pytest.approx(audiocraft_kl(gen, ref))  # not symmetric
    with pytest.raises(ValueError, match="same"):
        audiocraft_kl(ref, gen[:, :10])


def test_kld_from_audio_with_a_fake_classifier():
    rng = np.random.RandomState(7)
    reference = rng.randn(5, 300) * 0.1 + rng.randn(5, 1) * 0.2
    generated = rng.randn(5, 240) * 0.1
    classifier = MeanBandClassifier()
    assert isinstance(classifier, Classifier)
    value = kld_from_audio(classifier, reference, generated, sample_rate=16000, batch_size=2)
    expected = kl_divergence(MeanBandClassifier()(reference, 16000), MeanBandClassifier()(generated, 16000))
    assert value == pytest.approx(expected, rel=1e-12) and value > 0
    assert [shape[0] for shape, _ in classifier.calls] == [2, 2, 1, 2, 2, 1]
    assert all(rate == 16000 for _, rate in classifier.calls)
    assert kld_from_audio(lambda audio, sr: MeanBandClassifier()(audio, sr), reference, reference, 16000) == \
        pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="same number of clips"):
        kld_from_audio(classifier, reference, generated[:4], 16000)
    with pytest.raises(ValueError, match="generated_audio"):
        kld_from_audio(lambda audio, sr: np.ones((1, 3)) / 3, reference[:1], generated[:1, None], 16000)
    with pytest.raises(ValueError, match="classifier must return"):
        kld_from_audio(lambda audio, sr: np.ones((1, 3)) / 3, reference, generated, 16000)


# ------------------------------------------------------------------------------------------------------------ MCC

def test_mulan_cycle_consistency_matches_hand_computation():
    rng = np.random.RandomState(8)
    text, audio = rng.randn(6, 16), rng.randn(6, 16)
    expected = np.mean([t @ a / (np.linalg.norm(t) * np.linalg.norm(a)) for t, a in zip(text, audio)])
    assert mulan_cycle_consistency(text, audio) == pytest.approx(expected, rel=1e-12)
    assert mulan_cycle_consistency(text, 3.0 * text) == pytest.approx(1.0, rel=1e-12)
    assert mulan_cycle_consistency(text, -text) == pytest.approx(-1.0, rel=1e-12)
    # Only matching pairs count: a permutation of the audio rows changes the value.
    assert mulan_cycle_consistency(text, text[::-1]) < 1.0
    with pytest.raises(ValueError, match="audio_embeddings must have the shape"):
        mulan_cycle_consistency(text, audio[:5])
    with pytest.raises(ValueError, match="text_embeddings has a zero"):
        mulan_cycle_consistency(np.zeros_like(text), audio)


# ---------------------------------------------------------------------------------------------------- memorization

def test_memorization_on_hand_made_tokens():
    true = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
                     [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
                     [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
                     [5, 5, 5, 5, 5, 5, 5, 5, 5, 5]])
    generated = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10],  # exact
                          [1, 2, 3, 4, 5, 6, 7, 8, 9, 0],  # 1 of 10 differs: distance 0.1
                          [1, 2, 3, 4, 5, 0, 0, 0, 0, 0],  # 5 of 10 differ
                          [5, 5, 5, 5, 5, 5, 5, 5, 5, 5]])  # exact
    np.testing.assert_allclose(normalized_hamming_distance(true, generated), [0.0, 0.1, 0.5, 0.0])
    result = memorization(true, generated)
    assert result == pytest.approx({"exact_match_fraction": 0.5, "approximate_match_fraction": 0.75,
                                    "mean_token_agreement": 1.0 - 0.6 / 4})
    assert memorization(true, generated, approximate_threshold=0.0)["approximate_match_fraction"] == 0.5
    assert memorization(true, generated, approximate_threshold=0.5)["approximate_match_fraction"] == 1.0
    assert memorization(true, generated, approximate_threshold=0.05)["approximate_match_fraction"] == 0.5
    # A one-token shift is not a match under our position-aligned definition.
    shifted = memorization(true[:1, 1:], true[:1, :-1])
    assert shifted == {"exact_match_fraction": 0.0, "approximate_match_fraction": 0.0, "mean_token_agreement": 0.0}


def test_memorization_errors():
    tokens = np.zeros((2, 4), np.int32)
    with pytest.raises(ValueError, match="same"):
        memorization(tokens, tokens[:, :3])
    with pytest.raises(ValueError, match="generated must hold integer"):
        memorization(tokens, tokens.astype(np.float32))
    with pytest.raises(ValueError, match="true_continuations must be"):
        memorization(tokens[0], tokens)
    with pytest.raises(ValueError, match="approximate_threshold"):
        memorization(tokens, tokens, approximate_threshold=1.5)
