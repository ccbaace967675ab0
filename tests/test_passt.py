"""PaSST import: the front end and the logits of a random-initialised PaSST converted by
`python -m musiclm_jax.convert passt`, against the torch reference (needs the `convert` extra's torch).

The reference: hear21passt itself when it imports (`hear21passt.base`: it needs torchaudio and timm, whose PyPI
builds are CUDA builds that do not load with this project's torch 2.13.0+cpu, so the `convert` extra does not
install them). Otherwise FALLBACK: `_FallbackMel` / `_FallbackPaSST` / `_FallbackWrapper` below, a torch
re-statement of hear21passt 0.0.26's eval path (models/preprocess.py AugmentMelSTFT, torchaudio 2.11's
compliance.kaldi.get_mel_banks, models/passt.py PaSST, wrapper.py PasstBasicWrapper) written for these tests, with
the reference's parameter names. The JAX code was also checked once against the real hear21passt 0.0.26 code
(full size, random weights): mel within 7.5e-5, logits within 2.4e-7.
"""
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from musiclm_jax.convert.__main__ import main as convert_main  # noqa: E402
from musiclm_jax.convert.passt import (PaSSTStateDictError, config_from_state_dict, convert_passt,  # noqa: E402
                                       strip_wrapper)
from musiclm_jax.networks.passt import PaSSTConfig, log_mel  # noqa: E402
from musiclm_jax.evaluation.passt_model import PaSSTClassifier, PaSSTModel, audiocraft_segments  # noqa: E402

RATE = 32000
TINY = dict(embed_dim=96, depth=2, num_heads=12)  # 12 heads: the count the converter assumes (not in the weights)


# ---------------------------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------------------------

def _real_hear21passt():
    """hear21passt's modules, or None where it (or its torchaudio / timm) does not import."""
    try:
        from hear21passt.models.passt import PaSST as RealPaSST
        from hear21passt.models.preprocess import AugmentMelSTFT
        from hear21passt.wrapper import PasstBasicWrapper
    except Exception:  # ImportError, or OSError from a torchaudio built for CUDA
        return None
    return RealPaSST, AugmentMelSTFT, PasstBasicWrapper


class _FallbackMel(torch.nn.Module):
    """FALLBACK reference: hear21passt's AugmentMelSTFT as get_basic_model builds it, eval mode only."""

    def __init__(self, n_mels=128, sr=32000, win_length=800, hopsize=320, n_fft=1024, fmin=0.0, fmax=None,
                 fmax_aug_range=2000):
        super().__init__()
        self.n_mels, self.sr, self.win_length, self.hopsize, self.n_fft = n_mels, sr, win_length, hopsize, n_fft
        self.fmin = fmin
        self.fmax = sr // 2 - fmax_aug_range // 2 if fmax is None else fmax
        self.register_buffer("window", torch.hann_window(win_length, periodic=False), persistent=False)
        self.register_buffer("preemphasis_coefficient", torch.as_tensor([[[-.97, 1]]]), persistent=False)

    @staticmethod
    def _kaldi_mel_banks(num_bins, window_length_padded, sample_freq, low_freq, high_freq):
        """torchaudio.compliance.kaldi.get_mel_banks with vtln_warp_factor=1 (float32 as torchaudio computes it)."""
        def mel_scale(freq):
            return 1127.0 * (1.0 + freq / 700.0).log()
        num_fft_bins = window_length_padded / 2
        fft_bin_width = sample_freq / window_length_padded
        mel_low, mel_high = 1127.0 * math.log(1.0 + low_freq / 700.0), 1127.0 * math.log(1.0 + high_freq / 700.0)
        delta = (mel_high - mel_low) / (num_bins + 1)
        b = torch.arange(num_bins).unsqueeze(1)
        left, center, right = mel_low + b * delta, mel_low + (b + 1.0) * delta, mel_low + (b + 2.0) * delta
        mel = mel_scale(fft_bin_width * torch.arange(num_fft_bins)).unsqueeze(0)
        up, down = (mel - left) / (center - left), (right - mel) / (right - center)
        return torch.max(torch.zeros(1), torch.min(up, down))

    def forward(self, x):
        x = torch.nn.functional.conv1d(x.unsqueeze(1), self.preemphasis_coefficient).squeeze(1)
        x = torch.stft(x, self.n_fft, hop_length=self.hopsize, win_length=self.win_length, center=True,
                       normalized=False, window=self.window, return_complex=True)
        x = torch.view_as_real(x).pow(2).sum(-1)
        banks = self._kaldi_mel_banks(self.n_mels, self.n_fft, self.sr, self.fmin, self.fmax)
        banks = torch.nn.functional.pad(banks, (0, 1), mode="constant", value=0)
        melspec = (torch.matmul(banks, x) + 0.00001).log()
        return (melspec + 4.5) / 5.


class _FallbackBlock(torch.nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.attn = torch.nn.Module()
        self.attn.qkv, self.attn.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.mlp = torch.nn.Module()
        self.mlp.fc1, self.mlp.fc2 = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (c // self.num_heads) ** -0.5).softmax(dim=-1)
        x = x + self.attn.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class _FallbackPaSST(torch.nn.Module):
    """FALLBACK reference: hear21passt's PaSST (distilled, no patchout), eval forward -> (logits, features)."""

    def __init__(self, img_size=(128, 998), patch_size=16, stride=10, num_classes=527, embed_dim=768, depth=12,
                 num_heads=12, distilled=True):
        super().__init__()
        assert distilled
        grid = (img_size[0] // stride, img_size[1] // stride)
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=stride)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, embed_dim) * .02)
        self.dist_token = torch.nn.Parameter(torch.randn(1, 1, embed_dim) * .02)
        self.new_pos_embed = torch.nn.Parameter(torch.randn(1, 2, embed_dim) * .02)
        self.freq_new_pos_embed = torch.nn.Parameter(torch.randn(1, embed_dim, grid[0], 1) * .02)
        self.time_new_pos_embed = torch.nn.Parameter(torch.randn(1, embed_dim, 1, grid[1]) * .02)
        self.blocks = torch.nn.Sequential(*[_FallbackBlock(embed_dim, num_heads) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = torch.nn.Sequential(torch.nn.LayerNorm(embed_dim), torch.nn.Linear(embed_dim, num_classes))
        self.head_dist = torch.nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = self.patch_embed.proj(x)  # [b, e, f, t]
        x = x + self.time_new_pos_embed[:, :, :, :x.shape[-1]] + self.freq_new_pos_embed
        x = x.flatten(2).transpose(1, 2)
        b = x.shape[0]
        cls = self.cls_token.expand(b, -1, -1) + self.new_pos_embed[:, :1, :]
        dist = self.dist_token.expand(b, -1, -1) + self.new_pos_embed[:, 1:, :]
        x = self.norm(self.blocks(torch.cat((cls, dist, x), dim=1)))
        features = (x[:, 0] + x[:, 1]) / 2
        return self.head(features), features


class _FallbackWrapper(torch.nn.Module):
    """FALLBACK reference: PasstBasicWrapper(mode='logits')."""

    def __init__(self, mel, net):
        super().__init__()
        self.mel, self.net = mel, net
        self.device_proxy = torch.nn.Parameter(torch.zeros((1)))

    def forward(self, x):
        return self.net(self.mel(x).unsqueeze(1))[0]


def _reference_mel():
    """get_basic_model's front end, eval mode."""
    real = _real_hear21passt()
    if real is None:
        return _FallbackMel().eval()
    return real[1](n_mels=128, sr=32000, win_length=800, hopsize=320, n_fft=1024, freqm=48, timem=192, htk=False,
                   fmin=0.0, fmax=None, norm=1, fmin_aug_range=10, fmax_aug_range=2000).eval()


def _reference_model(seed: int = 0, **sizes):
    """get_basic_model(mode='logits') with random weights (no download), of `sizes` (default: the released ones)."""
    torch.manual_seed(seed)
    kwargs = dict(img_size=(128, 998), patch_size=16, stride=10, num_classes=527, embed_dim=768, depth=12,
                  num_heads=12, distilled=True)
    kwargs.update(sizes)
    real = _real_hear21passt()
    net = _FallbackPaSST(**kwargs) if real is None else real[0](**kwargs)
    with torch.no_grad():  # the reference initialises the heads to zero: give them weights so logits vary
        for p in list(net.head.parameters()) + list(net.head_dist.parameters()):
            p.normal_(0.0, 0.05)
    wrapper = _FallbackWrapper if real is None else (lambda mel, net: real[2](mel=mel, net=net, mode="logits"))
    return wrapper(_reference_mel(), net).eval()


def _audio(seconds: float, batch: int = 2, seed: int = 0) -> np.ndarray:
    """Pink-ish noise with a slow amplitude swing: every mel band well above the reference's float32 noise."""
    n = int(seconds * RATE)
    rng = np.random.RandomState(seed)
    spectrum = np.fft.rfft(rng.randn(batch, n)) / np.sqrt(np.arange(n // 2 + 1) + 1.0)
    x = np.fft.irfft(spectrum, n) * (1.0 + 0.5 * np.sin(2 * np.pi * 0.3 * np.arange(n) / RATE))
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def _reference_logits(model, audio: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(audio)).numpy()


@pytest.fixture(scope="module")
def tiny_reference():
    return _reference_model(**TINY)


@pytest.fixture(scope="module")
def tiny_dir(tiny_reference, tmp_path_factory):
    """The tiny reference converted once through the command line (the whole wrapper's state dict)."""
    root = tmp_path_factory.mktemp("passt")
    torch.save(tiny_reference.state_dict(), root / "passt.pt")
    convert_main(["passt", "--from", str(root / "passt.pt"), "--to", str(root / "passt")])
    return str(root / "passt")


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seconds", [10.0, 4.0])
def test_front_end_matches_reference(seconds):
    audio = _audio(seconds)
    with torch.no_grad():
        want = _reference_mel()(torch.from_numpy(audio)).numpy()
    got = np.asarray(log_mel(jnp.asarray(audio)))
    frames = PaSSTConfig().num_frames(audio.shape[1])
    assert got.shape == want.shape == (2, 128, frames) and frames == {10.0: 1000, 4.0: 400}[seconds]
    assert np.max(np.abs(got - want)) < 1e-4, float(np.max(np.abs(got - want)))


def test_converted_logits_match_reference(tiny_reference, tiny_dir):
    classifier = PaSSTClassifier.from_checkpoint(tiny_dir)
    assert classifier.config == PaSSTConfig(**TINY)
    for seconds in (10.0, 4.0):  # 99 time patches, and a prefix of the time positional embedding (39)
        audio = _audio(seconds, seed=int(seconds))
        want = _reference_logits(tiny_reference, audio)
        got = classifier.batch_logits(audio, RATE)
        assert got.shape == want.shape == (2, 527)
        assert np.max(np.abs(got - want)) < 1e-4, (seconds, float(np.max(np.abs(got - want))))
        one = classifier.logits(audio[0], RATE)
        assert np.max(np.abs(one - want[0])) < 1e-4
        softmax = torch.softmax(torch.from_numpy(want), dim=-1).numpy()  # audiocraft's kld.py
        np.testing.assert_allclose(classifier.probabilities(audio[0], RATE), softmax[0], atol=1e-6)
        np.testing.assert_allclose(classifier(audio, RATE), softmax, atol=1e-6)
    # another rate is resampled to 32 kHz; too long a clip is refused with the way out named
    assert classifier(_audio(2.0)[:, ::2], RATE // 2).shape == (2, 527)
    with pytest.raises(ValueError, match="audiocraft_segments"):
        classifier.logits(np.zeros(RATE * 11, np.float32), RATE)


def test_net_layout_and_real_size(tmp_path):
    """The network's own state dict (the released file's layout) converts like the wrapper's; the released sizes
    are read back from the tensors and the converted tree is PaSSTModel's."""
    reference = _reference_model(seed=1)
    net_sd = reference.net.state_dict()
    config = config_from_state_dict(net_sd)
    assert config == PaSSTConfig()
    params = convert_passt(net_sd, config)
    wrapper_params = convert_passt(reference.state_dict(), config)
    jax.tree.map(np.testing.assert_array_equal, params, wrapper_params)
    model = PaSSTModel(config)
    expected = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), model.input_shapes(1)))
    assert jax.tree.map(np.shape, expected["params"]) == jax.tree.map(np.shape, params)
    audio = _audio(1.0, batch=1)  # 100 frames, 9 time patches: short enough for the full size on CPU
    got = np.asarray(model.logits(params, jnp.asarray(audio)))
    want = _reference_logits(reference, audio)
    assert np.max(np.abs(got - want)) < 1e-4, float(np.max(np.abs(got - want)))


def test_bad_state_dict_names_missing_and_unexpected_keys(tiny_reference, tmp_path):
    state_dict = dict(tiny_reference.state_dict())
    del state_dict["net.blocks.1.mlp.fc2.weight"], state_dict["net.head.0.bias"]
    state_dict["net.blocks.1.mlp.fc3.weight"] = torch.zeros(3)
    torch.save(state_dict, tmp_path / "bad.pt")
    with pytest.raises(PaSSTStateDictError) as error:
        convert_main(["passt", "--from", str(tmp_path / "bad.pt"), "--to", str(tmp_path / "out")])
    message = str(error.value)
    assert "blocks.1.mlp.fc2.weight" in message and "head.0.bias" in message and "blocks.1.mlp.fc3.weight" in message
    assert "head_dist" not in message  # the distillation head is read past, not reported
    assert set(strip_wrapper(tiny_reference.state_dict())) == set(tiny_reference.net.state_dict())


def test_audiocraft_segments_and_segment_probabilities(tiny_dir):
    lengths = lambda seconds: [s.shape[-1] for s in audiocraft_segments(np.zeros(int(seconds * RATE)))]  # noqa
    assert lengths(25.0) == [320000, 320000, 160000]
    assert lengths(20.15) == [320000, 320000]  # a last piece of exactly 0.15 s (4800 samples) is dropped
    assert lengths(20.2) == [320000, 320000, 6400]
    assert lengths(0.1) == []
    classifier = PaSSTClassifier.from_checkpoint(tiny_dir)
    audio = _audio(12.0, batch=1)[0]
    rows = classifier.segment_probabilities(audio, RATE)
    assert rows.shape == (2, 527)
    np.testing.assert_allclose(rows[1], classifier.probabilities(audio[RATE * 10:], RATE), atol=1e-6)
    np.testing.assert_allclose(classifier(audio[None], RATE)[0], rows.mean(axis=0), atol=1e-6)
