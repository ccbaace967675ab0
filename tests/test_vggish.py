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
from musiclm_jax.evaluation.vggish_model import VGGishEmbedder  # noqa: E402

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


@pytest.fixture(scope="module")
def vggish_dir(torch_vgg, tmp_path_factory):
    """torch_vgg converted once through the command line, FAD's embedding (no final ReLU, no PCA)."""
    root = tmp_path_factory.mktemp("vggish")
    torch.save(torch_vgg.state_dict(), root / "vggish.pth")
    convert_main(["vggish", "--from", str(root / "vggish.pth"), "--to", str(root / "vggish")])
    return str(root / "vggish")


def _fad_embedding(torch_vgg, audio: np.ndarray) -> np.ndarray:
    """torchvggish's examples through the torch VGG with its last ReLU removed (frechet-audio-distance's
    default VGGish embedding): [examples, 128]."""
    examples = torch.tensor(_reference_examples(audio), dtype=torch.float32)[:, None]
    body = torch.nn.Sequential(*list(torch_vgg.embeddings.children())[:-1])
    with torch.no_grad():
        x = torch_vgg.features(examples).permute(0, 2, 3, 1).reshape(len(examples), -1)
        return body(x).numpy()


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
def test_converted_vggish_matches_torchvggish(torch_vgg, vggish_dir, tmp_path, final_relu):
    if final_relu:
        torch.save(torch_vgg.state_dict(), tmp_path / "vggish.pth")
        convert_main(["vggish", "--from", str(tmp_path / "vggish.pth"), "--to", str(tmp_path / "vggish"),
                      "--final_relu"])
    embedder = VGGishEmbedder.from_checkpoint(str(tmp_path / "vggish") if final_relu else vggish_dir)
    audio = _audio()
    if final_relu:
        examples = torch.tensor(_reference_examples(audio), dtype=torch.float32)[:, None]
        with torch.no_grad():
            want = torch_vgg(examples).numpy()  # the torch module's output (ReLU on the embedding)
    else:  # FAD's embedding: torchvggish's last ReLU removed, as frechet-audio-distance does
        want = _fad_embedding(torch_vgg, audio)
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


def test_fad_vggish_of_the_generation_evaluation_equals_the_reference(torch_vgg, vggish_dir):
    """fad_vggish as gin/eval/musiccaps.gin computes it (the evaluation's 'vggish' embedder: every 0.96 s frame
    of every clip is one sample) against the reference: torchvggish's embeddings without the last ReLU, frames
    pooled over the set, np.cov and scipy.linalg.sqrtm (frechet-audio-distance's calculate_frechet_distance)."""
    from test_generation_metrics import scipy_frechet_distance

    from musiclm_jax.evaluation import embedders
    from musiclm_jax.evaluation.generation_metrics import frechet_audio_distance
    embedder = embedders.make_embedder("vggish", vggish_dir)
    reference = np.stack([_audio(4.0, seed=i) for i in range(6)])  # 4 frames each: 24 samples per set
    t = np.arange(reference.shape[1]) / RATE
    generated = np.stack([(0.3 * np.sign(np.sin(2 * np.pi * (220 + 40 * i) * t))
                           + 0.05 * np.random.RandomState(10 + i).randn(t.size)).astype(np.float32)
                          for i in range(6)])
    ours = [embedders.embed_clips(embedder, x, RATE, batch_size=4) for x in (reference, generated)]
    assert ours[0].shape == ours[1].shape == (24, 128)
    theirs = [np.concatenate([_fad_embedding(torch_vgg, clip) for clip in x]) for x in (reference, generated)]
    stats = [(e.mean(axis=0), np.cov(e, rowvar=False)) for e in theirs]
    want = scipy_frechet_distance(*stats[0], *stats[1])
    same_embeddings = frechet_audio_distance(*theirs)
    got = frechet_audio_distance(*ours)
    print(f"FAD_VGG: ours {got:.6f}, on the reference's embeddings {same_embeddings:.6f}, reference {want:.6f}")
    assert want > 0.1 * np.trace(stats[0][1])  # the two sets really differ
    assert same_embeddings == pytest.approx(want, rel=1e-6)
    assert got == pytest.approx(want, rel=1e-4)
