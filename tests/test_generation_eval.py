"""The generation evaluation on tiny random-init models: the entry point end to end (metrics.json, the clips, a
report whose files exist), FAD of a set against itself and another, KLD and MCC against direct computations,
memorization on a cache with planted and with unrelated training tokens, clear errors for bad settings, the eval
sets' test splits, and the codec and MuLan evaluations through the same entry point."""
import json
import os
import re

import numpy as np
import pytest
import scipy.special
import scipy.stats
import soundfile

from helpers import write_tiny_evaluation_models, write_tiny_run_directories
from musiclm_jax import eval as eval_lib
from musiclm_jax.data import audio_io, synthetic_music, token_cache
from musiclm_jax.evaluation import embedders, eval_data, generation_eval, memorization_eval
from musiclm_jax.evaluation.generation_metrics import frechet_audio_distance
from musiclm_jax.generation.pipeline import MusicLM

NUM_CAPTIONS = 5  # two batches of 4: the second one padded
DURATION_S = 1.0
BATCH_SIZE = 4
PROMPT_SECONDS = CONTINUATION_SECONDS = 0.48  # 12 semantic frames each (25 Hz), within the 50-frame window
PROMPT_FRAMES = CONTINUATION_FRAMES = 12
CHUNK_FRAMES = 25  # 1 s chunks
CHECKPOINTS = ("mulan", "codec", "semantic", "coarse", "fine")
MACROS = ("MULAN_CHECKPOINT", "CODEC_CHECKPOINT", "SEMANTIC_CHECKPOINT", "COARSE_CHECKPOINT", "FINE_CHECKPOINT")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Run directories of tiny random-init models: codec, MuLan (RVQ, vocabulary) and the three stages."""
    return write_tiny_run_directories(tmp_path_factory.mktemp("generation_eval_models"))


@pytest.fixture(scope="module")
def musiclm(model_dirs):
    """The MusicLM of model_dirs with gin/sample/musiclm.gin's sampling settings (as the entry point loads it)."""
    model = MusicLM.from_checkpoints(*(str(model_dirs / n) for n in CHECKPOINTS))
    model.log = None
    model.set_generation_params(duration_s=DURATION_S, temperature=(1.0, 0.95, 0.4), guidance_scale=3.0, seed=0)
    return model


def write_token_cache(token_dir, semantic, mulan, num_samples, texts=None):
    """A token cache (manifest, one finished train shard) of semantic [N, 25] and MuLan [N, 12] tokens."""
    import tensorflow as tf

    from musiclm_jax.data.token_cache import encode_example
    n = len(semantic)
    os.makedirs(os.path.join(token_dir, "train"), exist_ok=True)
    base = os.path.join(token_dir, token_cache.shard_name("train", 0, 1))
    with tf.io.TFRecordWriter(base + ".tfrecord") as writer:
        for i in range(n):
            tokens = {"semantic": np.asarray(semantic[i])[:, None], "mulan": np.asarray(mulan[i])[None]}
            writer.write(encode_example(f"clip{i}#0", (texts or [""] * n)[i], int(num_samples[i]), tokens))
    with open(base + ".json", "w") as f:
        json.dump({"examples": n, "clips": n, "skipped": {}, "dropped_tail_seconds": 0.0}, f)
    token_cache.write_manifest(token_dir, {
        "source": "test", "sample_rate": 24000, "chunk_seconds": 1.0, "min_clip_seconds": 0.1, "clips_per_shard": n,
        "tokenizers": {
            "semantic": {"sample_rate": 16000, "frame_rate": 25.0, "levels": 1, "codebook_size": 64,
                         "frames": CHUNK_FRAMES, "checkpoint": None},
            "mulan": {"sample_rate": 16000, "frame_rate": 1.0, "levels": 12, "codebook_size": 32, "frames": 1,
                      "checkpoint": None}},
        "splits": {"train": {"num_clips": n, "num_shards": 1}}, "complete": True})
    return str(token_dir)


@pytest.fixture(scope="module")
def planted_cache(tmp_path_factory, musiclm):
    """A cache whose 4 full chunks continue their prompts exactly as the semantic stage does (seed 0, batches of
    4), plus a chunk with only 6 real frames (too short for prompt + continuation, so not used)."""
    rng = np.random.RandomState(0)
    prompts, mulan = rng.randint(0, 64, (4, PROMPT_FRAMES)), rng.randint(0, 32, (4, 12))
    continuation = memorization_eval.semantic_continuations(musiclm, mulan, prompts, CONTINUATION_FRAMES, seed=0,
                                                          batch_size=BATCH_SIZE)
    tail = rng.randint(0, 64, (4, CHUNK_FRAMES - PROMPT_FRAMES - CONTINUATION_FRAMES))
    semantic = np.concatenate([prompts, continuation, tail], axis=1)
    semantic = np.insert(semantic, 2, rng.randint(0, 64, CHUNK_FRAMES), axis=0)
    mulan = np.insert(mulan, 2, rng.randint(0, 32, 12), axis=0)
    root = tmp_path_factory.mktemp("planted_cache")
    return write_token_cache(root, semantic, mulan, [24000, 24000, 6000, 24000, 24000])


@pytest.fixture(scope="module")
def evaluation_models(tmp_path_factory):
    """Tiny random-init VGGish and PaSST run directories."""
    return write_tiny_evaluation_models(tmp_path_factory.mktemp("evaluation_models"))


@pytest.fixture(scope="module")
def cli_run(model_dirs, planted_cache, evaluation_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("generation_eval_out")
    argv = ["--gin_file=gin/eval/generation.gin", f"--gin.OUTPUT_DIR='{out}'", f"--gin.TOKEN_DIR='{planted_cache}'",
            f"--gin.MAX_EXAMPLES={NUM_CAPTIONS}", f"--gin.DURATION_S={DURATION_S}", f"--gin.BATCH_SIZE={BATCH_SIZE}",
            f"--gin.generation_eval.evaluate_generation.prompt_seconds={PROMPT_SECONDS}",
            f"--gin.generation_eval.evaluate_generation.continuation_seconds={CONTINUATION_SECONDS}",
            "--gin.generation_eval.evaluate_generation.report_samples=2"]
    argv += [f"--gin.{m}='{model_dirs / n}'" for m, n in zip(MACROS, CHECKPOINTS)]
    argv += [f"--gin.CLAP_CHECKPOINT='{model_dirs / 'mulan'}'",  # any MuLan run directory loads as a CLAP does
             f"--gin.PASST_CHECKPOINT='{evaluation_models['passt']}'"]
    result = eval_lib.main(argv)
    return out, result


def test_the_entry_point_writes_metrics_clips_and_a_report(cli_run, model_dirs):
    out, result = cli_run
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics == json.loads(json.dumps(result))
    assert metrics["name"] == "generation" and metrics["checkpoint_dir"] == str(model_dirs / "semantic")
    assert metrics["num_examples"] == NUM_CAPTIONS and metrics["num_skipped"] == 0
    for key in ("fad_mulan", "kld_mulan_zero_shot", "kl_passt", "mulan_cycle_consistency", "clap_score",
                "memorization_exact_match_fraction",
                "memorization_approximate_match_fraction", "memorization_mean_token_agreement"):
        assert np.isfinite(metrics[key]), key
    assert metrics["fad_mulan"] >= 0 and metrics["kld_mulan_zero_shot"] >= 0
    assert -1 <= metrics["mulan_cycle_consistency"] <= 1
    # The cache's continuations are the stage's own: all reproduced (the short chunk is not used).
    assert metrics["memorization_exact_match_fraction"] == 1.0 and metrics["memorization_num_examples"] == 4
    assert "skipped_metrics" not in metrics
    wavs = sorted(w for w in os.listdir(out / "generated") if w.endswith(".wav"))
    assert len(wavs) == NUM_CAPTIONS
    info = soundfile.info(str(out / "generated" / wavs[0]))
    assert info.samplerate == 24000 and info.frames == int(DURATION_S * 24000)
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert [s["caption"] for s in samples] == [synthetic_music.clip_caption(i, seed=2) for i in range(NUM_CAPTIONS)]
    page = open(out / "report.html").read()
    files = re.findall(r'src="([^"]+)"', page)
    assert len(files) == 2 * 4  # 2 samples: generated and reference, spectrogram and player each
    for name in files:
        assert os.path.isfile(out / name), name
    assert "fad_mulan" in page and "memorization_exact_match_fraction" in page and samples[0]["caption"] in page


def _generated_and_reference(out, rate):
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    generated = np.stack([audio_io.load_audio(str(out / s["wav"]), rate) for s in samples])
    reference = np.stack([synthetic_music.generate_clip(i, seed=2, seconds=DURATION_S, sample_rate=rate)["audio"]
                          for i in range(len(samples))])
    return [s["caption"] for s in samples], generated, reference


def test_kld_with_the_zero_shot_classifier_equals_a_direct_computation(cli_run, musiclm):
    out, metrics = cli_run
    _, generated, reference = _generated_and_reference(out, musiclm.sample_rate)
    mulan = musiclm.mulan
    labels = mulan.embed_text(list(embedders.DEFAULT_LABELS))

    def probs(audio):
        at_16k = np.stack([audio_io.to_mono_at_rate(a, 24000, 16000) for a in audio])
        return scipy.special.softmax(mulan.embed_audio(at_16k) @ labels.T / 0.1, axis=1)
    eps = 1e-6
    expected = np.mean(scipy.stats.entropy(probs(reference) + eps, probs(generated) + eps, axis=1))
    assert metrics["kld_mulan_zero_shot"] == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_mcc_is_the_mean_mulan_score_of_the_generated_audio(cli_run, musiclm):
    out, metrics = cli_run
    captions, generated, _ = _generated_and_reference(out, musiclm.sample_rate)
    expected = float(np.mean(musiclm.mulan_scores(captions, generated)))
    assert metrics["mulan_cycle_consistency"] == pytest.approx(expected, abs=1e-5)


def test_clap_score_is_the_mean_caption_audio_cosine_at_the_claps_rate(cli_run, model_dirs, musiclm):
    """audiocraft's CLAP score: clip i resampled to the CLAP's rate (16 kHz for this tiny one, 48 kHz for
    LAION-CLAP), cosine of its unit-norm audio embedding with caption i's text embedding, averaged."""
    from musiclm_jax.mulan.inference import MuLan
    out, metrics = cli_run
    captions, generated, _ = _generated_and_reference(out, musiclm.sample_rate)
    clap = MuLan.from_checkpoint(str(model_dirs / "mulan"))
    audio = clap.embed_audio(np.stack([audio_io.to_mono_at_rate(a, 24000, clap.sample_rate) for a in generated]))
    text = clap.embed_text(captions)
    expected = float(np.mean(np.sum(audio * text, axis=1) / np.linalg.norm(audio, axis=1)
                             / np.linalg.norm(text, axis=1)))
    assert metrics["clap_score"] == pytest.approx(expected, abs=1e-5)


def test_kl_passt_is_audiocrafts_kl_of_the_passt_posteriors(cli_run, musiclm, evaluation_models):
    """kl_passt: both clips at 32 kHz, one softmax row per clip (1 s: one segment), KL(reference || generated +
    1e-6) summed over the 527 classes (audiocraft's torch formula, written out here), averaged."""
    from musiclm_jax.evaluation.passt_model import PaSSTClassifier
    out, metrics = cli_run
    _, generated, reference = _generated_and_reference(out, musiclm.sample_rate)
    classifier = PaSSTClassifier.from_checkpoint(evaluation_models["passt"])
    p = np.stack([classifier.probabilities(a, musiclm.sample_rate) for a in reference]).astype(np.float64)
    q = np.stack([classifier.probabilities(a, musiclm.sample_rate) for a in generated]).astype(np.float64)
    assert p.shape == (NUM_CAPTIONS, 527)
    expected = float(np.mean(np.sum(p * (np.log(p) - np.log(q + 1e-6)), axis=1)))
    assert metrics["kl_passt"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert metrics["kl_passt"] > 1e-4  # generated and reference posteriors differ


def test_passt_rows_of_long_clips_are_audiocrafts_segments(evaluation_models):
    """A 23 s clip: segments of 10, 10 and 3 s, each its own row (segment-major), as audiocraft cuts them; a tail
    of at most 0.15 s is dropped."""
    from musiclm_jax.evaluation.passt_model import PaSSTClassifier
    classifier = PaSSTClassifier.from_checkpoint(evaluation_models["passt"])
    rng = np.random.RandomState(0)
    audio = (0.1 * rng.randn(2, 23 * 16000)).astype(np.float32)
    rows = classifier.segment_rows(audio, 16000, batch_size=2)
    assert rows.shape == (6, 527)
    at_32k = audio_io.resample(audio, 16000, 32000)
    np.testing.assert_allclose(rows[3], classifier.probabilities(at_32k[1, 320000:640000], 32000), atol=1e-5)
    np.testing.assert_allclose(rows[4], classifier.probabilities(at_32k[0, 640000:], 32000), atol=1e-5)
    tail = np.concatenate([audio, np.zeros((2, 2000), np.float32)], axis=1)[:, :20 * 16000 + 2000]  # 0.125 s tail
    assert classifier.segment_rows(tail, 16000, 2).shape == (4, 527)


def test_clap_score_is_skipped_with_its_reason_without_a_clap(musiclm, tmp_path):
    metrics = generation_eval.evaluate_generation(
        "unused", str(tmp_path), musiclm=musiclm, max_examples=2, batch_size=2, duration_s=DURATION_S,
        report_samples=0)
    assert "clap_score" not in metrics
    assert "CLAP_CHECKPOINT" in metrics["skipped_metrics"]["clap_score"]
    assert "PASST_CHECKPOINT" in metrics["skipped_metrics"]["kl_passt"]
    assert "TOKEN_DIR" in metrics["skipped_metrics"]["memorization"]


class BandEnergies:
    """A plugged-in embedding model: log energy in 16 frequency bands (any object with embed() fits)."""

    name = "band_energies"

    def embed(self, audio, sample_rate):
        power = np.abs(np.fft.rfft(audio, axis=1)) ** 2
        return np.log(np.stack([b.sum(axis=1) for b in np.array_split(power, 16, axis=1)], axis=1) + 1e-9)


@pytest.mark.parametrize("kind", ["mulan", "plugged_in"])
def test_fad_of_a_set_against_itself_is_zero_and_against_another_positive(kind, musiclm):
    if kind == "mulan":
        embedder = embedders.MuLanEmbedder(musiclm.mulan)
    else:
        embedder = embedders.make_embedder(BandEnergies())
        assert isinstance(embedder, BandEnergies)
    clips = np.stack([synthetic_music.generate_clip(i, seed=2, seconds=1.0, sample_rate=24000)["audio"]
                      for i in range(6)])
    noise = 0.3 * np.random.RandomState(0).randn(6, 24000).astype(np.float32)
    reference = embedders.embed_clips(embedder, clips, 24000, 4)
    other = embedders.embed_clips(embedder, noise, 24000, 4)
    assert reference.shape[0] == 6 and reference.ndim == 2
    scale = np.trace(np.cov(reference.T))
    assert frechet_audio_distance(reference, reference) == pytest.approx(0.0, abs=1e-6 * scale)
    assert frechet_audio_distance(reference, other) > 0.1 * scale


def test_memorization_finds_planted_continuations_and_not_unrelated_ones(musiclm, planted_cache, tmp_path):
    metrics = memorization_eval.memorization_from_cache(musiclm, planted_cache, PROMPT_SECONDS, CONTINUATION_SECONDS,
                                                      batch_size=BATCH_SIZE)
    assert metrics["memorization_exact_match_fraction"] == 1.0
    assert metrics["memorization_approximate_match_fraction"] == 1.0
    assert metrics["memorization_mean_token_agreement"] == 1.0 and metrics["memorization_num_examples"] == 4
    rng = np.random.RandomState(1)
    unrelated = write_token_cache(tmp_path / "unrelated", rng.randint(0, 64, (6, CHUNK_FRAMES)),
                                  rng.randint(0, 32, (6, 12)), [24000] * 6)
    metrics = memorization_eval.memorization_from_cache(musiclm, unrelated, PROMPT_SECONDS, CONTINUATION_SECONDS,
                                                      batch_size=BATCH_SIZE)
    assert metrics["memorization_exact_match_fraction"] == 0.0
    assert metrics["memorization_approximate_match_fraction"] == 0.0
    assert metrics["memorization_mean_token_agreement"] < 0.2 and metrics["memorization_chance_agreement"] == 1 / 64
    with pytest.raises(ValueError, match="exceed the semantic stage's window of 50 frames"):
        memorization_eval.memorization_from_cache(musiclm, unrelated, 1.6, 0.48)


@pytest.mark.parametrize("setting,error,match", [
    ({"embedding_model": "trill"}, ValueError, "unknown embedding_model 'trill'"),
    ({"embedding_model": "vggish"}, ValueError, "'vggish' needs embedding_checkpoint"),
    ({"embedding_model": "features"}, ValueError, "'features' needs embedding_checkpoint"),
    ({"classifier": "leaf"}, ValueError, "unknown classifier 'leaf'"),
    ({"eval_data": "audio_folder:/nonexistent/clips"}, FileNotFoundError, "'/nonexistent/clips' is not a directory"),
    ({"eval_data": "musiccaps:/"}, FileNotFoundError, "musiccaps-public.csv"),
    ({"eval_data": "/data/clips"}, ValueError, "EVAL_DATA='/data/clips' is not"),
    ({"token_dir": "/nonexistent/tokens"}, FileNotFoundError, "/nonexistent/tokens is not a token cache"),
])
def test_bad_settings_fail_before_any_model_loads(setting, error, match, tmp_path):
    def load():
        raise AssertionError("the models were loaded before the settings were checked")
    with pytest.raises(error, match=re.escape(match)):
        generation_eval.evaluate_generation(str(tmp_path), str(tmp_path / "out"), musiclm=load, **setting)


def test_bad_settings_through_the_entry_point(tmp_path):
    argv = ["--gin_file=gin/eval/generation.gin", f"--gin.OUTPUT_DIR='{tmp_path / 'out'}'"]
    argv += [f"--gin.{m}='{tmp_path}'" for m in MACROS]
    with pytest.raises(ValueError, match="unknown embedding_model 'trill'"):
        eval_lib.main(argv + ["--gin.EMBEDDING_MODEL='trill'"])
    with pytest.raises(FileNotFoundError, match="/nonexistent/mc"):
        eval_lib.main(argv + ["--gin.EVAL_DATA='musiccaps:/nonexistent/mc'"])


def _tone(path, seconds, rate=16000, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)


def test_eval_sets_give_the_captioned_clips_of_their_test_split(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    lines = []
    for i, (split, seconds) in enumerate([("test", 1.5), ("train", 1.0), ("test", 0.5), ("test", 1.0)]):
        _tone(folder / f"c{i}.wav", seconds, freq=300.0 + 100 * i)
        lines.append(json.dumps({"audio_path": f"c{i}.wav", "caption": f"tone {i}", "split": split}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    examples = eval_data.eval_examples(f"audio_folder:{folder}", 24000, 1.0, max_examples=2)
    assert [e.caption for e in examples] == ["tone 0", "tone 2"]  # test split only, at most max_examples
    assert all(e.audio.shape == (24000,) and e.audio.dtype == np.float32 for e in examples)
    assert np.all(examples[1].audio[12000:] == 0)  # 0.5 s clip zero-padded to the duration
    mc = tmp_path / "musiccaps"
    mc.mkdir()
    rows = ["ytid,start_s,end_s,aspect_list,caption,is_audioset_eval"]
    for i, held_out in enumerate([True, False, True]):
        _tone(mc / f"yt{i}.wav", 1.0)
        rows.append(f'yt{i},0,10,"[\'tone\']",a tone {i},{held_out}')
    rows.append("missing,0,10,\"['x']\",deleted video,True")
    (mc / "musiccaps-public.csv").write_text("\n".join(rows) + "\n")
    examples = eval_data.eval_examples(f"musiccaps:{mc}", 24000, 1.0, max_examples=10)
    assert [(e.id, e.caption) for e in examples] == [("yt0", "a tone 0"), ("yt2", "a tone 2")]
    synthetic = eval_data.eval_examples(None, 24000, 0.5, max_examples=3)
    assert [e.caption for e in synthetic] == [synthetic_music.clip_caption(i, seed=2) for i in range(3)]
    with pytest.raises(ValueError, match="has 1 usable captioned clips in split 'train'"):
        eval_data.eval_examples(f"musiccaps:{mc}", 24000, 1.0, max_examples=10, split="train")


def test_evaluate_passes_output_dir_only_to_evaluators_that_take_it(tmp_path):
    calls = []

    def plain(checkpoint_dir):  # the codec and MuLan evaluators' signature
        calls.append(checkpoint_dir)
        return {"x": 1.0}

    def writer(checkpoint_dir, output_dir):
        calls.append((checkpoint_dir, output_dir))
        return {"y": 2.0}
    assert eval_lib.evaluate(evaluator=plain, checkpoint_dir=str(tmp_path), name="a")["x"] == 1.0
    result = eval_lib.evaluate(evaluator=writer, checkpoint_dir=str(tmp_path), name="b")
    assert calls == [str(tmp_path), (str(tmp_path), str(tmp_path / "eval" / "b"))] and result["y"] == 2.0
    assert os.path.isfile(tmp_path / "eval" / "a" / "metrics.json")


def test_the_mulan_evaluation_runs_from_the_same_entry_point(model_dirs, tmp_path):
    # (gin/eval/codec.gin runs the same way: tests/test_codec.py.)
    mulan = eval_lib.main(["--gin_file=gin/eval/mulan.gin", f"--gin.CHECKPOINT_DIR='{model_dirs / 'mulan'}'",
                           f"--gin.OUTPUT_DIR='{tmp_path}'", "--gin.mulan_eval.evaluate_mulan.max_examples=4"])
    assert mulan["num_examples"] == 4 and 0 <= mulan["text_to_audio_recall_at_1"] <= 1
    assert os.path.isfile(tmp_path / "metrics.json")
