"""VGGish import: the front end against torchvggish's on the same waveform, and a random-initialised torchvggish
VGG converted by `python -m musiclm_jax.convert vggish` against the torch module (needs the `convert` extra)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
torchvggish = pytest.importorskip("torchvggish")

from musiclm_jax.convert.__main__ import main as convert_main  # noqa: E402
from musiclm_jax.convert.vggish import VGGishStateDictError, convert_vggish  # noqa: E402
from musiclm_jax.networks.vggish import VGGishConfig, log_mel_examples  # noqa: E402
from musiclm_jax.vggish_model import VGGishEmbedder  # noqa: E402

RATE = 16000


def _audio(seconds: float = 3.5, seed: int = 0) -> np.ndarray:
    rng = np.random.RandomState(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 440.0 * t) * np.sin(2 * np.pi * 0.7 * t) + 0.05 * rng.randn(t.size)
            ).astype(np.float32)


def _reference_examples(audio: np.ndarray) -> np.ndarray:
    from torchvggish import vggish_input
    return vggish_input.waveform_to_examples(audio.astype(np.float64), RATE, return_tensor=False)


@pytest.fixture(scope="module")
def torch_vgg():
    """torchvggish's VGG with random weights (no download: the released weights are not used)."""
    torch.manual_seed(0)
    return torchvggish.torchvggish._vgg(postprocess=False).eval()


def test_front_end_matches_torchvggish():
    audio = _audio()
    want = _reference_examples(audio)  # [examples, 96, 64]
    got = np.asarray(log_mel_examples(audio[None]))[0]
    assert got.shape == want.shape == (3, 96, 64)  # 3.5 s: 348 frames, 3 whole examples
    assert np.max(np.abs(got - want)) < 1e-4, float(np.max(np.abs(got - want)))
    cfg = VGGishConfig()
    assert cfg.example_samples == 15600 and cfg.num_examples(15599) == 0 and cfg.num_examples(15600) == 1
    with pytest.raises(ValueError, match="at least 15600 samples"):
        log_mel_examples(np.zeros((1, 15000), np.float32))


@pytest.mark.parametrize("final_relu", [False, True])
def test_converted_vggish_matches_torchvggish(torch_vgg, tmp_path, final_relu):
    torch.save(torch_vgg.state_dict(), tmp_path / "vggish.pth")
    convert_main(["vggish", "--from", str(tmp_path / "vggish.pth"), "--to", str(tmp_path / "vggish")]
                 + (["--final_relu"] if final_relu else []))
    embedder = VGGishEmbedder.from_checkpoint(str(tmp_path / "vggish"))
    audio = _audio()
    examples = torch.tensor(_reference_examples(audio), dtype=torch.float32)[:, None]
    with torch.no_grad():
        if final_relu:
            want = torch_vgg(examples).numpy()  # the torch module's output (ReLU on the embedding)
        else:  # FAD's embedding: torchvggish's last ReLU removed, as frechet-audio-distance does
            body = torch.nn.Sequential(*list(torch_vgg.embeddings.children())[:-1])
            x = torch_vgg.features(examples).permute(0, 2, 3, 1).reshape(len(examples), -1)
            want = body(x).numpy()
    got = embedder.embed(audio, RATE)
    assert got.shape == want.shape == (3, 128)
    scale = float(np.max(np.abs(want)))
    error = float(np.max(np.abs(got - want)))
    print(f"VGGish final_relu={final_relu}: max |got - want| {error:.2e}, max |want| {scale:.3f}")
    assert error < 1e-4 * scale  # relative to the embeddings' size (observed 3.5e-7 of it)
    assert (want < 0).any() != final_relu  # the two embeddings really differ in the ReLU


def test_pca_postprocessor_and_bad_inputs(torch_vgg, tmp_path):
    rng = np.random.RandomState(1)
    pca = {"pca_eigen_vectors": rng.randn(128, 128).astype(np.float32) * 5.0,
           "pca_means": rng.randn(128, 1).astype(np.float32) * 0.01}
    torch.save(torch_vgg.state_dict(), tmp_path / "vggish.pth")
    torch.save(pca, tmp_path / "pca.pth")
    convert_main(["vggish", "--from", str(tmp_path / "vggish.pth"), "--to", str(tmp_path / "vggish"),
                  "--pca", str(tmp_path / "pca.pth")])
    embedder = VGGishEmbedder.from_checkpoint(str(tmp_path / "vggish"))
    audio = _audio(2.0)
    post = torchvggish.torchvggish.Postprocessor.__new__(torchvggish.torchvggish.Postprocessor)
    post._pca_matrix = torch.as_tensor(pca["pca_eigen_vectors"])
    post._pca_means = torch.as_tensor(pca["pca_means"].reshape(-1, 1))
    raw = embedder.embed(audio, RATE)
    with torch.no_grad():
        want = post.postprocess(torch.as_tensor(raw)).numpy().reshape(raw.shape)
    got = embedder.embed(audio, RATE, postprocess=True)
    assert got.shape == raw.shape and got.min() >= 0 and got.max() <= 255
    assert 0 < np.mean(got == 0) + np.mean(got == 255) < 1  # clipping is exercised, and not everywhere
    # Equal but for float32 rounding at a quantization boundary (at most one level, rarely).
    assert np.max(np.abs(got - want)) <= 1 and np.mean(got == want) > 0.99
    # Other rates are resampled to 16 kHz; too-short clips and foreign state dicts are named errors.
    assert embedder.embed(np.zeros(44100, np.float32), 44100).shape == (1, 128)
    with pytest.raises(ValueError, match="at least 15600 samples"):
        embedder.embed(np.zeros(8000, np.float32), RATE)
    state = {k: v for k, v in torch_vgg.state_dict().items() if k != "embeddings.4.bias"}
    with pytest.raises(VGGishStateDictError, match="embeddings.4.bias"):
        convert_vggish(state)
    with pytest.raises(SystemExit, match="vggish only"):
        convert_main(["clap", "--from", str(tmp_path), "--to", str(tmp_path / "x"), "--pca", "p.pth"])
