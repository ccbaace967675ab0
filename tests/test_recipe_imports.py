"""The recipe with imported components (`--codec_from encodec:DIR --semantic_from hubert:DIR --mulan_from clap:DIR`):
random-initialised small transformers EnCodec, HuBERT and CLAP checkpoint folders, built here, take the place of
the trained codec, w2v-BERT and MuLan. The chain runs end to end at tiny size on a folder of real-format files;
the stages' layouts follow the imports' token cache (EnCodec: 75 Hz, so three codec frames per 25 Hz semantic
frame). Needs the `convert` extra (torch, transformers, tokenizers)."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from helpers import CLAP_FEATURES, small_clap_model, write_word_tokenizer  # noqa: E402
from musiclm_jax import recipe  # noqa: E402
from musiclm_jax.data import audio_io, synthetic_music, token_cache  # noqa: E402

FILES = 27  # named so that the hash carve holds out 1 validation and 2 test files (as tests/test_recipe.py)
FAST = [f"{stage}_stage:{binding}" for stage in ("semantic", "coarse", "fine")
        for binding in ("TRAIN_STEPS=3", "WARMUP_STEPS=1")]
FAST += ["semantic_tokens:fit_semantic.fit_semantic_tokenizer.num_steps=2", "semantic_tokens:LAYER=1",
         "mulan_rvq:fit_rvq.fit_rvq.steps=2",
         "mulan_rvq:fit_rvq.fit_rvq.num_clips=32", "eval_generation:MAX_EXAMPLES=2", "eval_generation:BATCH_SIZE=2"]


def _perturbed(model):
    """Moves every weight off its initial value, so that each one matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _encodec(path):
    """A small EnCodec at 24 kHz, 75 Hz frames (strides 8, 5, 4, 2), 4 levels of 64 codes."""
    torch.manual_seed(0)
    config = transformers.EncodecConfig(num_filters=4, hidden_size=16, codebook_size=64, target_bandwidths=[0.9, 1.8],
                                        num_lstm_layers=1, num_residual_layers=1)
    model = transformers.EncodecModel(config)
    with torch.no_grad():
        for layer in model.quantizer.layers:  # random codebooks (the default buffers are zeros)
            layer.codebook.embed.normal_(0.0, 0.5)
    _perturbed(model).save_pretrained(path)


def _hubert(path):
    """A small HuBERT at 16 kHz with HuBERT's 320-sample hop (50 Hz), 2 layers of width 32."""
    torch.manual_seed(1)
    config = transformers.HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                       conv_dim=(16, 16, 16, 16, 16), conv_kernel=(10, 4, 4, 2, 2),
                                       conv_stride=(5, 4, 4, 2, 2), num_conv_pos_embeddings=16,
                                       num_conv_pos_embedding_groups=4, conv_bias=True)
    _perturbed(transformers.HubertModel(config)).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 16000}))


def _clap(path):
    """A small CLAP (HTSAT on 1 s windows at 16 kHz; a text tower long enough for the synthetic captions) with a
    word-level tokenizer.json."""
    small_clap_model(max_position_embeddings=80).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(CLAP_FEATURES))
    write_word_tokenizer(path / "tokenizer.json")


def _folder(root):
    """FILES synthetic pieces at mixed rates, some stereo or FLAC, a bad file; captions without a split."""
    root.mkdir()
    rows = []
    for i in range(FILES):
        clip = synthetic_music.generate_clip(i, seed=5, seconds=5.0, sample_rate=24000)
        rate = (16000, 22050, 44100, 48000)[i % 4]
        audio = audio_io.resample(clip["audio"], 24000, rate)
        if i % 3 == 0:
            audio = np.stack([audio, 0.8 * audio], axis=1)
        name = f"track_{i:02d}.{'flac' if i % 5 == 0 else 'wav'}"
        soundfile.write(str(root / name), audio, rate)
        rows.append({"audio_path": name, "caption": clip["caption"]})
    (root / "notes.wav").write_text("not audio")
    rows.append({"audio_path": "notes.wav", "caption": "a broken file"})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_recipe_runs_end_to_end_with_imported_codec_semantic_features_and_mulan(tmp_path):
    for build, name in ((_encodec, "encodec"), (_hubert, "hubert"), (_clap, "clap")):
        build(tmp_path / name)
    _folder(tmp_path / "music")
    out = tmp_path / "out"
    imports = ["--codec_from", f"encodec:{tmp_path / 'encodec'}", "--semantic_from", f"hubert:{tmp_path / 'hubert'}",
               "--mulan_from", f"clap:{tmp_path / 'clap'}"]
    parsed = recipe.parse_imports(f"encodec:{tmp_path / 'encodec'}", f"hubert:{tmp_path / 'hubert'}",
                                  f"clap:{tmp_path / 'clap'}")
    plan = recipe.folder_steps(str(out), recipe.DataSource("audio_dir", str(tmp_path / "music")), imports=parsed)
    steps = dict(plan)
    assert [name for name, _ in plan][:4] == ["codec", "hubert", "semantic_tokens", "mulan"]
    assert steps["codec"][:2] == ["musiclm_jax.convert", "encodec"] and "--bandwidth" in steps["codec"]
    assert steps["hubert"][:2] == ["musiclm_jax.convert", "hubert"] and steps["mulan"][:2] == ["musiclm_jax.convert",
                                                                                               "clap"]
    assert "--gin_file=gin/semantic/features_hubert.gin" in steps["semantic_tokens"]

    data_root_before = os.environ.get("MUSICLM_TFDS_DIR")
    result = recipe.main(["--output_dir", str(out), "--audio_dir", str(tmp_path / "music"), "--in_process", *imports]
                         + [f"--bind={b}" for b in FAST])
    assert os.environ.get("MUSICLM_TFDS_DIR") == data_root_before  # the run's data root does not outlive it
    quality = result["quality"]
    # The token cache holds the imports' tokens: EnCodec's 4 levels of 64 at 75 Hz, HuBERT's 50 Hz pooled to
    # 25 Hz, CLAP's RVQ; the stages took their layouts from it.
    manifest = token_cache.read_manifest(str(out / "tokens"))
    tokenizers = manifest["tokenizers"]
    assert (tokenizers["codec"]["frame_rate"], tokenizers["codec"]["levels"], tokenizers["codec"]["codebook_size"]) == (
        75.0, 4, 64)
    assert tokenizers["semantic"]["frame_rate"] == 25.0 and tokenizers["mulan"]["levels"] == 12
    coarse_config = (out / "coarse" / "config.gin").read_text()
    assert "TARGET_LENGTH = 300" in coarse_config  # 2 s: 50 semantic frames x 3 codec frames x 2 coarse levels
    # Every measure of quality.json, computed with the imported components.
    assert {"si_snr_db", "mel_distance"} <= set(quality["codec"]), quality["codec"]
    assert any(k.startswith("text_to_audio") for k in quality["mulan"]), quality["mulan"]
    assert "mulan_cycle_consistency" in quality["generation"], quality["generation"]
    assert np.isfinite(quality["generation"]["mulan_cycle_consistency"])
    data = next(iter(quality["data"].values()))
    assert data["bad_input"]["skipped"] == {"undecodable": 1}
    # A second run reuses every import (the convert steps are done) and runs nothing.
    again = recipe.main(["--output_dir", str(out), "--audio_dir", str(tmp_path / "music"), "--in_process", *imports]
                        + [f"--bind={b}" for b in FAST])
    assert set(again["timings"]) == {"total"}


def test_a_converted_run_directory_is_copied_and_bad_import_flags_are_named(tmp_path):
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "config.gin").write_text("# a run directory convert wrote\n")
    imports = recipe.parse_imports(codec_from=f"encodec:{converted}")
    name, action = imports["codec"].step("codec", str(tmp_path / "out" / "codec"))
    assert name == "codec" and isinstance(action, recipe.CopyRunDirectory)
    action(str(tmp_path / "out"))
    assert (tmp_path / "out" / "codec" / "config.gin").exists()
    with pytest.raises(SystemExit, match="--codec_from 'hubert:.*KIND one of encodec"):
        recipe.parse_imports(codec_from=f"hubert:{converted}")
    with pytest.raises(SystemExit, match="--mulan_from 'clap:/no/such'.*not a directory"):
        recipe.parse_imports(mulan_from="clap:/no/such")
    folder = recipe.parse_imports(codec_from=f"encodec:{tmp_path}")  # no config.gin: a checkpoint folder to convert
    plan = recipe.folder_steps(str(tmp_path / "o"), recipe.DataSource("audio_dir", str(tmp_path)), imports=folder)
    with pytest.raises(SystemExit, match="step 'codec' imports a checkpoint"):
        recipe.apply_bindings(plan, ["codec:TRAIN_STEPS=3"])
