"""Metrics for generated music: FAD, KLD of classifier posteriors, MuLan cycle consistency and memorization.

Pure numpy functions (float64 inside); no model is loaded here. Callers embed or classify the audio (VGGish or
another embedding for FAD, an audio classifier for KLD, MuLan for MCC) and pass the arrays in.

- `frechet_distance`, `embedding_statistics`, `frechet_audio_distance`: the Fréchet distance between two
  Gaussians fitted to embeddings (Fréchet Audio Distance when the embeddings are of audio), in squared
  embedding units.
- `kl_divergence`, `Classifier`, `kld_from_audio`: mean KL(p_ref || p_gen) between the class posteriors of
  paired reference and generated clips, in nats.
- `mulan_cycle_consistency`: mean cosine between each text embedding and the embedding of the audio generated
  from that text.
- `normalized_hamming_distance`, `memorization`: how often generated semantic-token continuations reproduce the
  training continuation exactly or approximately (our definition, see `memorization`).
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import numpy as np

DEFAULT_KL_EPS = 1e-6
DEFAULT_APPROXIMATE_THRESHOLD = 0.1


# ----------------------------------------------------------------------------------------------------------------
# Fréchet (audio) distance
# ----------------------------------------------------------------------------------------------------------------

def _symmetric_psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite [D, D] matrix via eigendecomposition.

    M = V diag(w) V^T  ->  M^(1/2) = V diag(sqrt(max(w, 0))) V^T. Eigenvalues that round-off made slightly
    negative are clamped to 0.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.maximum(eigenvalues, 0.0))) @ eigenvectors.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) for symmetric PSD sigma1 and sigma2 (both [D, D]).

    sigma1 sigma2 is not symmetric, but it is similar to the symmetric PSD matrix
    S = sigma1^(1/2) sigma2 sigma1^(1/2) (conjugate by sigma1^(1/2)), so both have the same non-negative
    eigenvalues, and tr((sigma1 sigma2)^(1/2)) = sum_i sqrt(lambda_i(S)). Working on S lets us use `eigvalsh`
    (a symmetric eigensolver) instead of a general matrix square root, which is stable even when a covariance is
    (nearly) singular; eigenvalues of S that round-off made slightly negative are clamped to 0.
    """
    sqrt_sigma1 = _symmetric_psd_sqrt(sigma1)
    s = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    s = 0.5 * (s + s.T)  # exactly symmetric for eigvalsh
    return float(np.sum(np.sqrt(np.maximum(np.linalg.eigvalsh(s), 0.0))))


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, mu_name: str,
                    sigma_name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, np.float64)
    sigma = np.asarray(sigma, np.float64)
    if mu.ndim != 1:
        raise ValueError(f"{mu_name} must be a [D] mean vector, got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{sigma_name} must be a [D, D] covariance matching {mu_name} (D={mu.shape[0]}), got "
                         f"shape {sigma.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"{mu_name} and {sigma_name} must be finite")
    return mu, 0.5 * (sigma + sigma.T)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), squared embedding units.

        d^2 = ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))

    Args:
      mu1, mu2: [D] means.
      sigma1, sigma2: [D, D] symmetric positive semi-definite covariances (symmetrised defensively).

    The trace of the matrix square root is computed in numpy from the eigenvalues of the symmetric matrix
    sigma1^(1/2) sigma2 sigma1^(1/2) (see `_trace_sqrt_product`), not with `scipy.linalg.sqrtm`; it agrees with
    the sqrtm formula to round-off and needs no imaginary-part clean-up. The result is a squared distance, so
    round-off below 0 (identical statistics) is clamped to 0.0. Symmetric in its two Gaussians.
    """
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "mu1", "sigma1")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "mu2", "sigma2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must have the same dimension, got {mu1.shape[0]} and {mu2.shape[0]}")
    diff = mu1 - mu2
    trace_term = float(np.trace(sigma1) + np.trace(sigma2)) - 2.0 * _trace_sqrt_product(sigma1, sigma2)
    value = float(diff @ diff) + trace_term
    return max(value, 0.0)


def _embedding_statistics(embeddings: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    embeddings = np.asarray(embeddings, np.float64)
    if embeddings.ndim != 2:
        raise ValueError(f"{name} must be [N, D] embeddings, got shape {embeddings.shape}")
    if embeddings.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples to estimate a covariance, got {embeddings.shape[0]}")
    if not np.all(np.isfinite(embeddings)):
        raise ValueError(f"{name} must be finite")
    mu = embeddings.mean(axis=0)
    centred = embeddings - mu
    sigma = centred.T @ centred / (embeddings.shape[0] - 1)
    return mu, sigma


def embedding_statistics(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased (N - 1 denominator, as `np.cov`) covariance [D, D] of [N, D] embeddings, N >= 2."""
    return _embedding_statistics(embeddings, "embeddings")


def frechet_audio_distance(reference_embeddings: np.ndarray, generated_embeddings: np.ndarray) -> float:
    """Fréchet Audio Distance: `frechet_distance` of Gaussians fitted to two embedding sets (squared units).

    Args:
      reference_embeddings: [N_ref, D] embeddings of reference audio (e.g. one VGGish frame per row), N_ref >= 2.
      generated_embeddings: [N_gen, D] embeddings of generated audio, N_gen >= 2; N_gen may differ from N_ref.

    Lower is better; the estimate is biased upwards for finite N (it is > 0 even for two sample sets of one
    distribution), so only compare values computed with similar N and D.
    """
    mu1, sigma1 = _embedding_statistics(reference_embeddings, "reference_embeddings")
    mu2, sigma2 = _embedding_statistics(generated_embeddings, "generated_embeddings")
    if mu1.shape != mu2.shape:
        raise ValueError(f"reference_embeddings and generated_embeddings must have the same embedding dimension, "
                         f"got {mu1.shape[0]} and {mu2.shape[0]}")
    return frechet_distance(mu1, sigma1, mu2, sigma2)


# ----------------------------------------------------------------------------------------------------------------
# KL divergence between class posteriors
# ----------------------------------------------------------------------------------------------------------------

def _check_probs(probs: np.ndarray, name: str) -> np.ndarray:
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[0] < 1 or probs.shape[1] < 1:
        raise ValueError(f"{name} must be [N, C] class probabilities with N, C >= 1, got shape {probs.shape}")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    if np.any(probs.sum(axis=1) <= 0):
        raise ValueError(f"{name} has a row that sums to 0")
    return probs


def kl_divergence(reference_probs: np.ndarray, generated_probs: np.ndarray, eps: float = DEFAULT_KL_EPS) -> float:
    """Mean over the N pairs of KL(p_ref || p_gen), in nats.

    Args:
      reference_probs: [N, C] class probabilities of the reference clips (row i pairs with generated row i).
      generated_probs: [N, C] class probabilities of the generated clips.
      eps: smoothing, >= 0. Both rows get eps added to every class and are then renormalised to sum to 1:
        p = (p_ref + eps) / sum(p_ref + eps), q = (p_gen + eps) / sum(p_gen + eps), KL = sum_c p_c log(p_c / q_c).
        The smoothing keeps KL finite when the generated posterior gives a class (almost) 0 probability, and the
        renormalisation keeps it a KL divergence between two distributions: >= 0, and exactly 0 for identical
        rows. With eps = 0 it is the plain KL (terms with p_c = 0 count 0; inf when q_c = 0 < p_c).

    Rows are normalised to sum to 1 in any case, so scores of a multi-label (sigmoid) classifier are read as a
    distribution over classes. The value equals `scipy.stats.entropy(p_ref + eps, p_gen + eps)` averaged over rows.
    """
    p = _check_probs(reference_probs, "reference_probs")
    q = _check_probs(generated_probs, "generated_probs")
    if p.shape != q.shape:
        raise ValueError(f"reference_probs and generated_probs must have the same [N, C] shape, got {p.shape} and "
                         f"{q.shape}")
    if not (np.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    p = p + eps
    q = q + eps
    p = p / p.sum(axis=1, keepdims=True)
    q = q / q.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):  # q_c = 0 -> inf; the p_c = 0 terms are masked to 0
        terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0)
    return float(np.mean(terms.sum(axis=1)))


def audiocraft_kl(reference_probs: np.ndarray, generated_probs: np.ndarray, eps: float = DEFAULT_KL_EPS) -> float:
    """audiocraft's PaSST KL ('kld', the figure MusicGen and audiocraft's model cards report), in nats: the mean
    over the N rows of sum_c p_c * (log p_c - log(q_c + eps)), with p the reference row and q the generated one,
    as audiocraft/metrics/kld.py's `kl_divergence(pred_probs=q, target_probs=p)` computes it with
    `torch.nn.functional.kl_div((q + eps).log(), p, reduction='none').sum(-1)`, averaged by
    `KLDivergenceMetric.compute` ('kld_pq'). Unlike `kl_divergence`, nothing is renormalised: only the generated
    side gets eps, and terms with p_c = 0 count 0 (kl_div's convention), so the value can be slightly negative
    where q already gives p's classes their mass. Rows are the classifier's softmax outputs (PaSST's 527 classes;
    audiocraft scores each <= 10 s segment of a clip as its own row, passt_model.audiocraft_segments).

    Args:
      reference_probs, generated_probs: [N, C] probabilities; row i of each is one (reference, generated) pair.
      eps: audiocraft's epsilon, 1e-6.
    """
    p = _check_probs(reference_probs, "reference_probs")
    q = _check_probs(generated_probs, "generated_probs")
    if p.shape != q.shape:
        raise ValueError(f"reference_probs and generated_probs must have the same [N, C] shape, got {p.shape} and "
                         f"{q.shape}")
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q + eps)), 0.0)
    return float(np.mean(terms.sum(axis=1)))


@runtime_checkable
class Classifier(Protocol):
    """An audio classifier: `classifier(audio [B, samples] float, sample_rate Hz) -> probs [B, C]`.

    The probabilities of each row are non-negative (softmax or sigmoid outputs; `kl_divergence` normalises rows).
    Any callable with this signature fits, e.g. a function or a model wrapper that resamples internally.
    """

    def __call__(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        ...


def _classify(classifier: Classifier, audio: np.ndarray, sample_rate: int, batch_size: Optional[int],
              name: str) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.ndim != 2 or audio.shape[0] < 1:
        raise ValueError(f"{name} must be [N, samples] audio with N >= 1, got shape {audio.shape}")
    step = audio.shape[0] if batch_size is None else batch_size
    parts = [np.asarray(classifier(audio[i:i + step], sample_rate)) for i in range(0, audio.shape[0], step)]
    probs = np.concatenate(parts, axis=0)
    if probs.ndim != 2 or probs.shape[0] != audio.shape[0]:
        raise ValueError(f"the classifier must return [B, C] probabilities for the {audio.shape[0]} clips of {name}, "
                         f"got shape {probs.shape}")
    return probs


def kld_from_audio(classifier: Classifier, reference_audio: np.ndarray, generated_audio: np.ndarray,
                   sample_rate: int, eps: float = DEFAULT_KL_EPS, batch_size: Optional[int] = None) -> float:
    """`kl_divergence` of the classifier's posteriors on paired reference and generated clips, in nats.

    Args:
      classifier: a `Classifier`, called on batches of at most `batch_size` clips (all at once when None).
      reference_audio: [N, samples] reference waveforms at `sample_rate`.
      generated_audio: [N, samples'] generated waveforms at `sample_rate` (clip i pairs with reference clip i;
        the lengths may differ).
      sample_rate: Hz, passed to the classifier.
      eps: smoothing of `kl_divergence`.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    reference_audio = np.asarray(reference_audio)
    generated_audio = np.asarray(generated_audio)
    if min(reference_audio.ndim, generated_audio.ndim) >= 1 and len(reference_audio) != len(generated_audio):
        raise ValueError(f"reference_audio and generated_audio must hold the same number of clips, got "
                         f"{reference_audio.shape[0]} and {generated_audio.shape[0]}")
    reference_probs = _classify(classifier, reference_audio, sample_rate, batch_size, "reference_audio")
    generated_probs = _classify(classifier, generated_audio, sample_rate, batch_size, "generated_audio")
    return kl_divergence(reference_probs, generated_probs, eps=eps)


# ----------------------------------------------------------------------------------------------------------------
# MuLan cycle consistency
# ----------------------------------------------------------------------------------------------------------------

def _l2_normalise(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError(f"{name} has a zero or non-finite row; its cosine is undefined")
    return x / norms


def mulan_cycle_consistency(text_embeddings: np.ndarray, audio_embeddings: np.ndarray) -> float:
    """MuLan cycle consistency: mean cosine similarity of the N matching (text, generated audio) pairs.

    Args:
      text_embeddings: [N, D] MuLan text embeddings of the prompts.
      audio_embeddings: [N, D] MuLan audio embeddings of the audio generated from prompt i (row i).

    Both are L2-normalised per row here (MuLan's are already), so the value is in [-1, 1]; higher is better.
    """
    text = np.asarray(text_embeddings, np.float64)
    audio = np.asarray(audio_embeddings, np.float64)
    if text.ndim != 2 or text.shape[0] < 1:
        raise ValueError(f"text_embeddings must be [N, D] with N >= 1, got shape {text.shape}")
    if audio.shape != text.shape:
        raise ValueError(f"audio_embeddings must have the shape of text_embeddings {text.shape}, got {audio.shape}")
    text = _l2_normalise(text, "text_embeddings")
    audio = _l2_normalise(audio, "audio_embeddings")
    return float(np.mean(np.sum(text * audio, axis=1)))


# ----------------------------------------------------------------------------------------------------------------
# Memorization
# ----------------------------------------------------------------------------------------------------------------

def _check_tokens(tokens: np.ndarray, name: str) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"{name} must be [N, T] token ids with N, T >= 1, got shape {tokens.shape}")
    if not (np.issubdtype(tokens.dtype, np.integer) or tokens.dtype == np.bool_):
        raise ValueError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    return tokens


def normalized_hamming_distance(true_continuations: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """[N] fraction of the T positions at which generated row i differs from true row i (0 = identical).

    Args:
      true_continuations: [N, T] integer token ids.
      generated: [N, T] integer token ids.
    """
    true_continuations = _check_tokens(true_continuations, "true_continuations")
    generated = _check_tokens(generated, "generated")
    if generated.shape != true_continuations.shape:
        raise ValueError(f"true_continuations and generated must have the same [N, T] shape, got "
                         f"{true_continuations.shape} and {generated.shape}")
    return np.mean(true_continuations != generated, axis=1)


def memorization(true_continuations: np.ndarray, generated: np.ndarray,
                 approximate_threshold: float = DEFAULT_APPROXIMATE_THRESHOLD) -> dict[str, float]:
    """How often prompted generations reproduce the training data (semantic tokens).

    Set-up, as in the memorization study of the MusicLM paper: for each of N training examples the semantic
    model is prompted with the example's first P tokens and generates the next T; `generated[i]` is compared
    with the example's own next T tokens, `true_continuations[i]`.

    Args:
      true_continuations: [N, T] integer semantic token ids of the training continuations.
      generated: [N, T] integer semantic token ids the model generated after the same prompts.
      approximate_threshold: in [0, 1], a fraction of the T positions (default 0.1).

    Returns a dict of floats:
      exact_match_fraction: fraction of the N continuations identical to the true one at all T positions.
      approximate_match_fraction: fraction whose normalised Hamming distance (fraction of positions that differ,
        `normalized_hamming_distance`) is <= `approximate_threshold`. This is OUR definition of an approximate
        match, not the paper's matching cost: it is position-aligned (a shift by one token is not a match).
        Exact matches count as approximate matches too, and approximate_threshold = 0 gives the exact fraction.
        The default 0.1 asks for at least 90 % of the tokens to be identical; with a vocabulary of hundreds of
        semantic tokens, chance agreement is far below that.
      mean_token_agreement: mean over the N pairs of the fraction of identical positions (1 - mean distance).
    """
    if not (0.0 <= approximate_threshold <= 1.0):
        raise ValueError(f"approximate_threshold must be in [0, 1], got {approximate_threshold}")
    distance = normalized_hamming_distance(true_continuations, generated)
    return {
        "exact_match_fraction": float(np.mean(distance == 0)),
        "approximate_match_fraction": float(np.mean(distance <= approximate_threshold)),
        "mean_token_agreement": float(1.0 - np.mean(distance)),
    }
