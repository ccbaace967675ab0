"""`python -m musiclm_jax.eval embed`: the saved arrays of VGGish, PaSST and CLAP (a MuLan run directory) equal the
embedders' own API on the same decoded audio; errors name the file or the model kind; the gin usage still
dispatches to gin. Tiny random-init run directories, written without torch."""
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from conftest import REPO_DIR, subprocess_env
from musiclm_jax import eval as eval_lib
from musiclm_jax.data import audio_io

TINY_VGGISH = ["vggish.VGGishConfig.hidden_size = 32"]  # the convolutions are fixed; embedding_size stays 128
TINY_PASST = ["passt.PaSSTConfig.embed_dim = 96", "passt.PaSSTConfig.depth = 2", "passt.PaSSTConfig.num_heads = 4"]


def _write_wav(path, seconds: float, rate: int, channels: int, seed: int) -> str:
    audio = 0.3 * np.random.RandomState(seed).uniform(-1, 1, (int(seconds * rate), channels))
    soundfile.write(str(path), audio.astype(np.float32), rate, subtype="FLOAT")
    return str(path)


# The `mulan` run directory is that of helpers.write_tiny_run_directories (same gin file and seed), without the
# codec, stages, RVQ and caption vocabulary it also writes (embed_audio needs none of them); a converted CLAP is a
# MuLan run directory and loads the same way.
WRITE_DIRS = """
import json, sys
from musiclm_jax import run_directory
for model_dir, gin_file, bindings, seed in json.loads(sys.argv[1]):
    run_directory.write_run_directory(model_dir, gin_file, bindings, seed=seed)
"""


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    paths = {name: str(root / name) for name in ("vggish", "passt", "mulan")}
    runs = [(paths["vggish"], "gin/eval/vggish.gin", TINY_VGGISH, 1), (paths["passt"], "gin/eval/passt.gin",
            TINY_PASST, 2), (paths["mulan"], "gin/mulan/tiny.gin", [], 2)]
    # In a one-device process: saving replicated parameters from the 8 fake devices of conftest compiles a slice
    # per replica and leaf, which doubles the time of this module.
    env = dict(subprocess_env(), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-c", WRITE_DIRS, json.dumps(runs)], cwd=REPO_DIR, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths["short"] = _write_wav(root / "short.wav", 2.5, 22050, 2, seed=0)
    paths["long"] = _write_wav(root / "long.wav", 12.0, 32000, 1, seed=1)
    paths["root"] = str(root)
    return paths


def test_vggish_embed_matches_api(dirs, tmp_path, capsys):
    from musiclm_jax.evaluation.vggish_model import VGGishEmbedder
    out = str(tmp_path / "sub" / "vggish.npy")
    returned = eval_lib.main(["embed", "--model", "vggish", "--checkpoint", dirs["vggish"], "--input", dirs["short"],
                              "--output", out])
    saved = np.load(out)
    assert saved.dtype == np.float32 and saved.shape == (2, 128)  # two whole 0.96 s examples in 2.5 s
    np.testing.assert_array_equal(saved, returned)
    embedder = VGGishEmbedder.from_checkpoint(dirs["vggish"])
    want = embedder.embed(audio_io.load_audio(dirs["short"], embedder.sample_rate), embedder.sample_rate)
    np.testing.assert_allclose(saved, want, atol=1e-6, rtol=0)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "(2, 128)" in line and out in line
    with pytest.raises(SystemExit, match="vggish_pca.npz"):  # no PCA converted with this checkpoint
        eval_lib.main(["embed", "--model", "vggish", "--checkpoint", dirs["vggish"], "--input", dirs["short"],
                       "--output", out, "--postprocess"])


def test_passt_embed_matches_api(dirs, tmp_path):
    from musiclm_jax.evaluation.passt_model import PaSSTClassifier
    out = str(tmp_path / "passt.npy")
    saved = eval_lib.main(["embed", "--model", "passt", "--checkpoint", dirs["passt"], "--input", dirs["long"],
                           "--output", out])
    np.testing.assert_array_equal(np.load(out), saved)
    assert saved.dtype == np.float32 and saved.shape == (2, 527)  # 12 s: a 10 s and a 2 s audiocraft segment
    np.testing.assert_allclose(saved.sum(axis=1), 1.0, atol=1e-5)
    classifier = PaSSTClassifier.from_checkpoint(dirs["passt"])
    want = classifier.segment_probabilities(audio_io.load_audio(dirs["long"], classifier.sample_rate),
                                            classifier.sample_rate)
    np.testing.assert_allclose(saved, want, atol=1e-6, rtol=0)


def test_clap_embed_matches_api(dirs, tmp_path):
    from musiclm_jax.mulan.inference import MuLan
    out = str(tmp_path / "clap.npy")
    saved = eval_lib.main(["embed", "--model", "clap", "--checkpoint", dirs["mulan"], "--input", dirs["short"],
                           "--output", out])
    np.testing.assert_array_equal(np.load(out), saved)
    model = MuLan.from_checkpoint(dirs["mulan"])
    assert saved.dtype == np.float32 and saved.shape == (model.embed_dim,)
    np.testing.assert_allclose(np.linalg.norm(saved), 1.0, atol=1e-5)
    want = model.embed_audio(audio_io.load_audio(dirs["short"], model.sample_rate))
    np.testing.assert_allclose(saved, want, atol=1e-6, rtol=0)


def test_errors_name_the_file_or_the_model_kind(dirs, tmp_path):
    out = str(tmp_path / "e.npy")
    missing = str(tmp_path / "nowhere.wav")
    with pytest.raises(SystemExit, match="nowhere.wav"):
        eval_lib.main(["embed", "--model", "vggish", "--checkpoint", dirs["vggish"], "--input", missing,
                       "--output", out])
    with pytest.raises(SystemExit) as e:
        eval_lib.main(["embed", "--model", "passt", "--checkpoint", dirs["vggish"], "--input", dirs["short"],
                       "--output", out])
    assert "VGGishModel" in str(e.value) and "PaSST" in str(e.value) and dirs["vggish"] in str(e.value)
    with pytest.raises(SystemExit, match="not a directory"):
        eval_lib.main(["embed", "--model", "clap", "--checkpoint", str(tmp_path / "no_run"), "--input",
                       dirs["short"], "--output", out])
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all" * 10)
    with pytest.raises(SystemExit, match="garbage.wav"):
        eval_lib.main(["embed", "--model", "clap", "--checkpoint", dirs["mulan"], "--input", str(garbage),
                       "--output", out])
    with pytest.raises(SystemExit):  # argparse: an unknown model
        eval_lib.main(["embed", "--model", "openl3", "--checkpoint", dirs["vggish"], "--input", dirs["short"],
                       "--output", out])
    assert not (tmp_path / "e.npy").exists()


def test_gin_usage_still_goes_to_gin(monkeypatch):
    """Anything but `embed` is parsed as gin flags, as before (gin_utils.run replaced: nothing is evaluated)."""
    seen = {}

    def fake_run(main, argv=None, **kwargs):
        seen["argv"] = list(argv)
        return {"ran": True}
    monkeypatch.setattr(eval_lib.gin_utils, "run", fake_run)
    argv = ["--gin_file=gin/eval/codec.gin", "--gin.CHECKPOINT_DIR='/ckpt'"]
    assert eval_lib.main(argv) == {"ran": True}
    assert seen["argv"] == argv
