"""Every gin file parses; experiments build their objects; gin mistakes are errors; README and CI agree."""
import fnmatch
import os
import re

import gin
import pytest

from conftest import REPO_DIR
from helpers import planned_token_dir
from musiclm_jax import gin_utils
from musiclm_jax.tokenize import tokenize_dataset  # noqa: F401  (gin/tokenize binds it)
from musiclm_jax.train import train  # noqa: F401  (the run files bind train_lib.train)

GIN_DIR = os.path.join(REPO_DIR, "gin")
ALL_GIN = gin_utils.gin_files_in(GIN_DIR)
EXPERIMENT_DIRS = tuple(os.path.join(GIN_DIR, d) for d in ("stages", "codec", "w2v_bert", "mulan"))
EXPERIMENTS = [f for f in ALL_GIN  # training runs (gin/mulan/rvq_*.gin configure the RVQ's fit job instead)
               if (f.startswith(EXPERIMENT_DIRS) and not os.path.basename(f).startswith("rvq_"))
               or f.endswith(os.path.join("semantic", "hubert.gin"))]
TRAIN_ARGS = ["model", "optimizer", "train_dataset_cfg", "mesh_config", "total_steps", "model_dir"]


def test_the_expected_gin_files_exist():
    names = {os.path.relpath(f, REPO_DIR) for f in ALL_GIN}
    assert {"gin/stages/semantic_tiny.gin", "gin/stages/semantic_paper.gin", "gin/stages/semantic_synthetic.gin",
            "gin/runs/pretrain.gin",
            "gin/models/semantic_tiny.gin", "gin/models/semantic_paper.gin", "gin/codec/tiny.gin",
            "gin/codec/paper.gin", "gin/codec/encodec_24khz.gin", "gin/runs/codec_gan.gin", "gin/eval/codec.gin",
            "gin/w2v_bert/tiny.gin", "gin/w2v_bert/paper.gin", "gin/semantic/hubert.gin",
            "gin/semantic/kmeans_tiny.gin",
            "gin/semantic/kmeans_w2v_bert.gin", "gin/semantic/kmeans_hubert.gin", "gin/tokenize/tiny.gin",
            "gin/tokenize/paper.gin", "gin/mulan/tiny.gin", "gin/mulan/paper.gin", "gin/mulan/clap.gin",
            "gin/eval/mulan.gin", "gin/stages/coarse_tiny.gin", "gin/stages/coarse_paper.gin",
            "gin/stages/fine_tiny.gin", "gin/stages/fine_paper.gin", "gin/sample/musiclm.gin",
            "gin/eval/generation.gin", "gin/stages/semantic_melody_paper.gin"} <= names


@pytest.mark.parametrize("path", ALL_GIN, ids=lambda p: os.path.relpath(p, GIN_DIR))
def test_every_gin_file_parses(path):
    gin_utils.parse_gin([path], [], finalize=False)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: os.path.relpath(p, GIN_DIR))
def test_every_experiment_builds_its_objects(path):
    tokens = planned_token_dir("paper" if "paper" in os.path.basename(path) else "tiny")
    gin_utils.parse_gin([os.path.relpath(path, REPO_DIR)], ["MODEL_DIR = '/tmp/unused'", f"TOKEN_DIR = '{tokens}'"],
                        finalize=True)
    args = gin_utils.bound_arguments("train", TRAIN_ARGS, {})
    model, data = args["model"], args["train_dataset_cfg"]
    if "_stage:" in data.mixture_or_task_name:  # stages on a token cache: the task names the cache and the crop
        stage = os.path.basename(path).split("_")[0]
        assert data.mixture_or_task_name.startswith(f"{stage}_stage:{tokens}?seconds=")
    if hasattr(model, "sequence_length"):  # token stages
        assert model.sequence_length == data.task_feature_lengths["inputs"] + data.task_feature_lengths["targets"]
        assert args["optimizer"].schedule(0) == 0.0  # warmup starts at 0
    elif hasattr(model, "text_length"):  # MuLan: audio of its window and rate, captions of its text length
        assert data.task_feature_lengths == {"audio": model.segment_samples, "text": model.text_length}
        assert data.mixture_or_task_name == f"synthetic_music_{model.sample_rate}hz"
        assert model.feature_converter_name == "audio_text"
    else:  # raw-audio models (codec, w2v-BERT, HuBERT): audio of the model's segment length and rate
        assert data.task_feature_lengths == {"audio": model.segment_samples}
        assert data.mixture_or_task_name == f"synthetic_music_{model.sample_rate}hz"


@pytest.mark.parametrize("path,rate", [("gin/codec/tiny.gin", 24000), ("gin/w2v_bert/tiny.gin", 16000)])
def test_audio_dir_selects_a_folder_task(path, rate):
    gin_utils.parse_gin([path], ["MODEL_DIR = '/tmp/unused'", "AUDIO_DIR = '/data/my_clips'"])
    data = gin_utils.bound_arguments("train", ["train_dataset_cfg"], {})["train_dataset_cfg"]
    assert data.mixture_or_task_name == f"audio_folder_{rate}hz:/data/my_clips"


@pytest.mark.parametrize("bindings,expected", [
    ([], "synthetic_music_24000hz"),
    (["AUDIO_DIR = '/data/clips'", "BAD_INPUT = 'error'"], "audio_folder_24000hz:/data/clips?bad_input=error"),
    (["MUSICCAPS_DIR = '/data/mc'", "REQUIRE_CAPTIONS = True"], "musiccaps_24000hz:/data/mc?require_captions=true"),
])
def test_tokenize_and_audio_runs_name_their_source(bindings, expected):
    gin_utils.parse_gin(["gin/tokenize/tiny.gin"], ["OUTPUT_DIR = '/tmp/o'", "CODEC_CHECKPOINT = '/c'",
                                                    "SEMANTIC_CHECKPOINT = '/s'", "MULAN_CHECKPOINT = None"] + bindings)
    args = gin_utils.bound_arguments("tokenize_dataset", ["source", "chunk_seconds"], {})
    # The job's source names no rate: tokenize_dataset reads it at its codec's (24 kHz for the tiny codec).
    assert args["source"].sample_rate is None and args["chunk_seconds"] == 4.0
    assert args["source"].at_rate(24000).task_name == expected
    gin.clear_config()
    gin_utils.parse_gin(["gin/codec/tiny.gin"], ["MODEL_DIR = '/tmp/unused'"] + bindings)
    data = gin_utils.bound_arguments("train", ["train_dataset_cfg"], {})["train_dataset_cfg"]
    assert data.mixture_or_task_name == expected


def test_paper_mulan_has_the_paper_sizes():
    gin_utils.parse_gin(["gin/mulan/paper.gin"], ["MODEL_DIR = '/tmp/unused'"])
    model = gin_utils.bound_arguments("train", ["model"], {})["model"]
    audio, text = model.network.audio, model.network.text
    assert (audio.stage_sizes, audio.width, audio.output_dim, audio.n_mels, audio.sample_rate) == (
        (3, 4, 6, 3), 64, 2048, 64, 16000)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (768, 12, 12)
    assert model.network.embed_dim == 128 and model.segment_samples == 160000


def test_paper_semantic_stage_has_the_paper_sizes():
    gin_utils.parse_gin(["gin/stages/semantic_paper.gin"], ["MODEL_DIR = '/tmp/unused'",
                                                            f"TOKEN_DIR = '{planned_token_dir('paper')}'"])
    args = gin_utils.bound_arguments("train", TRAIN_ARGS, {})
    net = args["model"].network
    assert (net.num_layers, net.num_heads, net.embed_dim, net.mlp_dim) == (24, 16, 1024, 4096)
    assert 420e6 < net.num_params() < 440e6
    assert args["model"].prefix_length == 12 and args["model"].target_length == 750  # 30 s at 25 Hz
    assert args["train_dataset_cfg"].batch_size == 256
    assert args["train_dataset_cfg"].mixture_or_task_name == f"semantic_stage:{planned_token_dir('paper')}?seconds=30.0"
    assert args["model"].guidance_groups == ("mulan",) and args["model"].conditioning_dropout == 0.1


def test_required_macro_left_unset_is_an_error():
    with pytest.raises(ValueError, match="MODEL_DIR"):
        gin_utils.parse_gin(["gin/stages/semantic_synthetic.gin"], [], finalize=True)
    gin.clear_config()
    with pytest.raises(ValueError, match="TOKEN_DIR"):
        gin_utils.parse_gin(["gin/stages/semantic_tiny.gin"], ["MODEL_DIR = '/x'"], finalize=True)


def test_gin_typos_are_errors():
    with pytest.raises(ValueError, match="embed_dimm"):
        gin_utils.parse_gin(["gin/stages/semantic_synthetic.gin"],
                            ["MODEL_DIR='/x'", "transformer.TransformerConfig.embed_dimm = 3"])
    with pytest.raises(FileNotFoundError, match="no_such.gin"):
        gin_utils.parse_gin(["gin/stages/no_such.gin"], [])
    with pytest.raises(gin_utils.FlagError, match="unknown flag --topolgy"):
        gin_utils.parse_flags(["--gin_file=a.gin", "--topolgy=v5e:4x4"], {"topology": None})


def test_flag_parsing():
    flags = gin_utils.parse_flags(["--gin_file=a.gin", "--gin.MODEL_DIR='/tmp/x'", "--gin_file", "b.gin",
                                   "--gin.train_lib.train.total_steps=5", "--topology=v4:2x2x1"], {"topology": None})
    assert flags["gin_files"] == ["a.gin", "b.gin"]
    assert flags["gin_bindings"] == ["MODEL_DIR = '/tmp/x'", "train_lib.train.total_steps = 5"]
    assert flags["topology"] == "v4:2x2x1"


def test_gin_files_ship_as_package_data():
    setup = open(os.path.join(REPO_DIR, "setup.py")).read()
    patterns = re.search(r'"musiclm_jax.gin": \[([^\]]*)\]', setup).group(1)
    patterns = [p.strip().strip('"') for p in patterns.split(",") if p.strip()]
    for path in ALL_GIN:
        rel = os.path.relpath(path, GIN_DIR)
        assert any(fnmatch.fnmatch(rel, p) and rel.count("/") == p.count("/") for p in patterns), rel


def test_readme_test_command_is_what_ci_runs():
    readme = open(os.path.join(REPO_DIR, "README.md")).read()
    ci = [line for line in open(os.path.join(REPO_DIR, ".ci", "run")).read().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith("set ") and not line.startswith("cd ")]
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    quick_start = blocks[0].strip().splitlines()
    assert len(quick_start) == 2, quick_start
    assert ci == [quick_start[1]]
    assert "python -m musiclm_jax.demo" in quick_start[0]  # the main job: text -> music end to end


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()
