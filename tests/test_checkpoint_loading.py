"""Loading a model for inference from its run directory: parameters only (no optimizer state read), the same
values the full train state holds, and the caller's gin configuration left as it was."""
import os

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import planned_token_dir
from musiclm_jax import checkpoint_loading, gin_utils, run_directory
from musiclm_jax.codec.inference import Codec


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    stage = run_directory.write_run_directory(str(root / "stage"), "gin/stages/semantic_tiny.gin",
                                                   [f"TOKEN_DIR = '{planned_token_dir()}'"], seed=5)
    codec = run_directory.write_run_directory(str(root / "codec"), "gin/codec/tiny.gin", [], seed=6)
    return {"stage": stage, "codec": codec}


def test_a_stage_loads_its_parameters_and_reads_no_optimizer_state(run_dirs, monkeypatch):
    requested = []
    restore = ocp.PyTreeCheckpointer.restore

    def recording(self, path, *args, **kwargs):
        requested.append(sorted(kwargs["args"].item))
        return restore(self, path, *args, **kwargs)
    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", recording)
    loaded = checkpoint_loading.load_model(run_dirs["stage"])
    saved = checkpoint_loading.saved_tree(run_dirs["stage"])
    assert sorted(saved) == ["flax_mutables", "opt_state", "params", "step"]
    assert len(jax.tree.leaves(saved["opt_state"])) >= 2 * len(jax.tree.leaves(saved["params"]))  # Adam: mu, nu
    assert requested == [["params"]]  # the token LM has no other collection; the optimizer state is not read
    assert loaded.step == 0 and loaded.flax_mutables == {}
    # The same values the whole train state holds.
    path, _ = checkpoint_loading.checkpoint_path(run_dirs["stage"])
    full = ocp.StandardCheckpointer().restore(path)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.params), full["params"])


def test_the_codec_loads_its_codebooks_too(run_dirs):
    loaded = checkpoint_loading.load_model(run_dirs["codec"])
    path, _ = checkpoint_loading.checkpoint_path(run_dirs["codec"])
    full = ocp.StandardCheckpointer().restore(path)
    assert sorted(loaded.flax_mutables) == sorted(full["flax_mutables"]) != []
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.flax_mutables), full["flax_mutables"])


def test_loading_leaves_the_callers_gin_configuration_intact(run_dirs, tmp_path):
    gin_utils.parse_gin(["gin/w2v_bert/tiny.gin"], ["MODEL_DIR = '/my/run'", "TRAIN_STEPS = 7"])
    try:
        before = gin.config_str()
        assert gin.query_parameter("%TRAIN_STEPS") == 7
        codec = Codec.from_checkpoint(run_dirs["codec"])
        assert codec.sample_rate == 24000
        run_directory.write_run_directory(str(tmp_path / "another"), "gin/codec/tiny.gin", [], seed=7)
        assert gin.config_str() == before
        assert gin.query_parameter("%TRAIN_STEPS") == 7 and gin.query_parameter("%MODEL_DIR") == "/my/run"
    finally:
        gin.clear_config()


def test_directories_that_are_not_runs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no config.gin"):
        checkpoint_loading.load_model(str(tmp_path))
    (tmp_path / "config.gin").write_text(open(os.path.join(os.path.dirname(__file__), "..", "gin", "codec",
                                                           "tiny.gin")).read())
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no checkpoint"):
        checkpoint_loading.checkpoint_path(str(tmp_path))


def test_a_stage_run_records_its_cache_sizes_and_loads_without_the_cache(tmp_path):
    """The stage gin files read their layout and lengths from the token cache's manifest (data/stages.py); the
    run's config.gin records the values, so the run loads after the cache is gone."""
    import shutil
    tokens = tmp_path / "tokens"
    shutil.copytree(planned_token_dir(), tokens)
    run = run_directory.write_run_directory(str(tmp_path / "coarse"), "gin/stages/coarse_melody_tiny.gin",
                                                 [f"TOKEN_DIR = '{tokens}'"], seed=8)
    config = (tmp_path / "coarse" / "config.gin").read_text()
    assert "PREFIX_LENGTH = 112" in config and "TARGET_LENGTH = 200" in config  # 12 + 2 x 50; 50 frames x 2 x 2
    assert "@stages.stage_" not in config
    shutil.rmtree(tokens)
    model = checkpoint_loading.model_from_run(run)
    assert (model.prefix_length, model.target_length, model.layout.vocab_size) == (112, 200, 1 + 384 + 13 + 64 + 1024)
    assert tuple((g.name, g.levels, g.codebook_size) for g in model.layout.groups) == (
        ("mulan", 12, 32), ("melody", 1, 13), ("semantic", 1, 64), ("coarse", 2, 512))
