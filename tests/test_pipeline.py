"""The generation chain on tiny random-init models: audio of the requested duration at the codec rate,
deterministic for a seed, guidance 1 equal to plain sampling, sliding windows past every stage's window,
continuation keeping the prompt's tokens, and story mode switching the conditioning at its boundaries."""
import numpy as np
import pytest

from helpers import planned_token_dir, write_tiny_run_directories
from musiclm_jax.data import audio_io, synthetic_music
from musiclm_jax.generation.pipeline import MusicLM
from musiclm_jax.generation.stage_sampling import Stage


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Run directories of tiny random-init models: codec, MuLan (with RVQ and vocabulary), semantic tokenizer and
    the three stages."""
    return write_tiny_run_directories(tmp_path_factory.mktemp("pipeline_models"), semantic_tokenizer=True)


@pytest.fixture(scope="module")
def melody_coarse_dir(model_dirs):
    """The run directory of a random-init coarse stage that takes the melody (gin/stages/coarse_melody_tiny.gin)."""
    from musiclm_jax import run_directory
    coarse_dir = model_dirs / "coarse_melody"
    run_directory.write_run_directory(str(coarse_dir), "gin/stages/coarse_melody_tiny.gin",
                                           [f"TOKEN_DIR = '{planned_token_dir()}'"], seed=9)
    return coarse_dir


@pytest.fixture(scope="module")
def musiclm(model_dirs):
    model = MusicLM.from_checkpoints(*(str(model_dirs / n) for n in ("mulan", "codec", "semantic", "coarse", "fine")),
                                     semantic_tokenizer=str(model_dirs / "tokenizer"))
    model.log = None
    return model


def test_generate_gives_the_duration_and_is_deterministic(musiclm):
    musiclm.set_generation_params(duration_s=2.0, seed=3)
    audio = musiclm.generate(["a calm piano melody", "loud rock drums"])
    assert audio.shape == (2, 48000) and audio.dtype == np.float32 and np.all(np.isfinite(audio))
    np.testing.assert_array_equal(musiclm.generate(["a calm piano melody", "loud rock drums"]), audio)
    musiclm.set_generation_params(seed=4)
    assert not np.array_equal(musiclm.generate(["a calm piano melody", "loud rock drums"]), audio)


def test_tokens_fill_every_frame_past_each_stage_window(musiclm):
    # 3 s: 75 semantic frames (window 50), 150 codec frames (coarse window 100, fine window 50).
    musiclm.set_generation_params(duration_s=3.0, seed=0, guidance_scale=1.0)
    tokens = musiclm.generate_tokens(["slow waltz on strings"])
    assert tokens["mulan"].shape == (1, 12) and tokens["semantic"].shape == (1, 75)
    assert tokens["codes"].shape == (1, 150, 4) and 0 <= tokens["codes"].min() and tokens["codes"].max() < 512
    assert tokens["semantic"].max() < 64
    # Sliding windows keep the frames of earlier windows: the first window's semantic tokens are unchanged when
    # the same seed asks for a shorter clip.
    musiclm.set_generation_params(duration_s=2.0)
    short = musiclm.generate_tokens(["slow waltz on strings"])
    np.testing.assert_array_equal(short["semantic"], tokens["semantic"][:, :50])


def test_guidance_scale_one_is_plain_sampling_and_other_scales_change_it(musiclm):
    musiclm.set_generation_params(duration_s=1.0, seed=5, guidance_scale=1.0)
    plain = musiclm.generate_tokens(["bright synth"])
    musiclm.set_generation_params(guidance_scale=3.0)
    guided = musiclm.generate_tokens(["bright synth"])
    assert not np.array_equal(guided["semantic"], plain["semantic"])  # the semantic stage is guided
    # The coarse stage is guided too: on the same semantic tokens its codes change with the scale.
    for scale in (1.0, 3.0):
        musiclm.set_generation_params(guidance_scale=scale)
        codes = musiclm._run_stage("coarse", 50, 100, 2, lambda b, e, f: np.concatenate(
            [musiclm.stages["coarse"].model.layout.to_global(plain["mulan"], "mulan"),
             musiclm.stages["coarse"].model.layout.to_global(plain["semantic"][:, :25], "semantic")], axis=1),
            None, 1, musiclm.params)
        if scale == 1.0:
            unguided = codes
    assert not np.array_equal(codes, unguided)
    with pytest.raises(TypeError, match="unknown generation parameters"):
        musiclm.set_generation_params(durations=3)


def test_rerank_keeps_the_candidate_closest_to_the_caption(musiclm):
    musiclm.set_generation_params(duration_s=1.0, seed=11, guidance_scale=1.0)
    texts = ["a calm piano melody", "loud rock drums"]
    result = musiclm.generate(texts, rerank=3, return_details=True)
    audio, scores, choice = result.audio, result.scores, result.choice
    assert audio.shape == (2, 24000) and scores.shape == (2, 3)
    np.testing.assert_array_equal(musiclm.generate(texts, rerank=3), audio)  # the same, without the details
    np.testing.assert_array_equal(choice, np.argmax(scores, axis=1))
    # The candidates are the plain batch of the captions each repeated 3 times (same seed): check the kept one.
    candidates = musiclm.generate([t for t in texts for _ in range(3)])
    for b in range(2):
        kept = candidates[3 * b + choice[b]]
        np.testing.assert_array_equal(audio[b], kept)
        np.testing.assert_allclose(musiclm.mulan_scores(texts[b:b + 1], kept[None]), scores[b, choice[b]], atol=1e-5)
    assert len({round(float(x), 6) for x in scores.ravel()}) > 1  # the candidates differ
    with pytest.raises(ValueError, match="rerank=0"):
        musiclm.generate(texts, rerank=0)


def _record_prefixes(monkeypatch, stage_name: str) -> list:
    """Makes Stage.sample record (a copy of) each window prefix of stage `stage_name`; returns the list."""
    calls = []
    original = Stage.sample

    def spy(self, prefix, steps, prompt_length, keys, params, temperature):
        if self.name == stage_name:
            calls.append(np.array(prefix))
        return original(self, prefix, steps, prompt_length, keys, params, temperature)
    monkeypatch.setattr(Stage, "sample", spy)
    return calls


def _scale_melody() -> np.ndarray:
    """2.4 s of melody at 24 kHz: C D E F G A, 0.4 s each (12 frames at 5 Hz)."""
    t = np.arange(9600) / 24000
    return np.concatenate([0.3 * np.sin(2 * np.pi * 440 * 2 ** ((n - 69) / 12) * t) for n in (60, 62, 64, 65, 67, 69)])


def test_melody_tokens_fill_the_semantic_prefix_window_by_window(musiclm, monkeypatch):
    calls = _record_prefixes(monkeypatch, "semantic")
    musiclm.set_generation_params(duration_s=3.0, seed=4, guidance_scale=1.0)
    tune = _scale_melody()  # the 3 s request has 15 melody frames
    assert musiclm.melody_rate == 5.0 and musiclm.melody_length == 50 and musiclm.melody_repeat == 5
    result = musiclm.generate(["a flute melody"], melody=tune, return_details=True)
    assert result.audio.shape == (1, 72000)
    want = np.repeat([0, 2, 4, 5, 7, 9], 2)
    np.testing.assert_array_equal(result.tokens["melody"], want[None])
    per_frame = np.repeat(want, 5)  # one melody token per semantic frame: 60 frames of melody
    layout = musiclm.stages["semantic"].model.layout
    # Semantic windows (50 frames): 0-50, then frames 50-75 after 25 of context (window 25-75).
    assert len(calls) == 2
    for prefix, begin in zip(calls, (0, 25)):
        expected = np.zeros(50, np.int32)  # PAD past the melody's end
        known = per_frame[begin:begin + 50]
        expected[:len(known)] = layout.to_global(known[None], "melody")[0]
        np.testing.assert_array_equal(prefix[0, 12:62], expected)
    calls.clear()
    musiclm.generate(["a flute melody"])  # no melody: PAD, as in the training examples whose melody was dropped
    assert all(np.all(prefix[:, 12:62] == 0) for prefix in calls)
    with pytest.raises(ValueError, match="2 melodies for 1 captions"):
        musiclm.generate(["x"], melody=np.stack([tune, tune]))


def test_a_melody_coarse_stage_gets_the_melody_of_each_semantic_frame_of_its_window(model_dirs, melody_coarse_dir,
                                                                                    monkeypatch):
    """gin/stages/coarse_melody_tiny.gin: the coarse prefix is MuLan, the melody token of each semantic frame of the
    window (PAD past the melody's end, or all PAD without one), then the window's semantic tokens."""
    musiclm = MusicLM.from_checkpoints(*(str(model_dirs / n) for n in ("mulan", "codec", "semantic")),
                                       str(melody_coarse_dir), str(model_dirs / "fine"))
    musiclm.log = None
    assert musiclm.melody_stages == ("semantic", "coarse")
    calls = _record_prefixes(monkeypatch, "coarse")
    musiclm.set_generation_params(duration_s=3.0, seed=4, guidance_scale=1.0)
    tune = _scale_melody()
    result = musiclm.generate(["a flute melody"], melody=tune, return_details=True)
    assert result.audio.shape == (1, 72000)
    per_frame = np.repeat(np.repeat([0, 2, 4, 5, 7, 9], 2), 5)  # the melody of semantic frames 0-59
    layout = musiclm.stages["coarse"].model.layout
    # Coarse windows of 100 codec frames (50 semantic): 0-100, then 100-150 after 50 of context (window 50-150,
    # semantic frames 25-75).
    assert len(calls) == 2
    for prefix, first in zip(calls, (0, 25)):
        expected = np.zeros(50, np.int32)
        known = per_frame[first:first + 50]
        expected[:len(known)] = layout.to_global(known[None], "melody")[0]
        np.testing.assert_array_equal(prefix[0, 12:62], expected)
        np.testing.assert_array_equal(prefix[0, 62:112],
                                      layout.to_global(result.tokens["semantic"][:, first:first + 50], "semantic")[0])
    calls.clear()
    musiclm.generate(["a flute melody"])
    assert len(calls) == 2 and all(np.all(prefix[:, 12:62] == 0) for prefix in calls)


def test_a_batch_of_windows_is_laid_over_every_device_and_samples_the_same_tokens(musiclm):
    """Stage.from_checkpoint on this process's 8 (test) devices: a batch of at least 8 windows runs with its rows
    over the data axes (padded to a multiple of 8, parameters replicated) and gives the tokens the same stage gives
    on one device, row for row; a smaller batch runs on one device."""
    import jax
    stage = musiclm.stages["semantic"]
    assert stage.partitioner is not None and stage.partitioner.data_parallel_size == 8
    single = Stage(stage.model, stage.params, "semantic")
    params = musiclm.generation_params(guidance_scale=3.0, seed=0)
    for batch in (8, 10):
        rng = np.random.RandomState(batch)
        prefix = np.concatenate([stage.model.layout.to_global(rng.randint(0, 32, (batch, 12)), "mulan"),
                                 np.zeros((batch, 50), np.int64)], axis=1).astype(np.int32)
        keys = jax.random.split(jax.random.key(batch), batch)
        sharded = stage.sample(prefix, 20, 0, keys, params, 1.0)
        assert sharded.shape == (batch, 20)
        np.testing.assert_array_equal(sharded, single.sample(prefix, 20, 0, keys, params, 1.0))
    assert all(len(leaf.sharding.device_set) == 8 for leaf in jax.tree.leaves(stage._replicated))
    signatures = [s[0] for s in stage._samplers]
    assert (8, 62) in signatures and (16, 62) in signatures  # 10 rows padded to 16


def test_continuation_keeps_the_prompt_tokens_as_prefix(musiclm):
    musiclm.set_generation_params(duration_s=2.0, seed=1, guidance_scale=1.0)
    prompt = synthetic_music.generate_clip(3, seed=7, seconds=1.0, sample_rate=24000)["audio"]
    result = musiclm.generate_continuation(prompt, ["the same, louder"], return_details=True)
    audio, tokens = result.audio, result.tokens
    assert audio.shape == (1, 48000) and tokens["semantic"].shape == (1, 50)
    resampled = musiclm.semantic_tokenizer.tokenize(audio_io.resample(prompt[None], 24000, 16000))
    np.testing.assert_array_equal(tokens["semantic"][:, :25], resampled[:, :25])
    np.testing.assert_array_equal(tokens["codes"][:, :50], musiclm.codec.encode(prompt[None])[:, :50])
    with pytest.raises(ValueError, match="not shorter than duration_s"):
        musiclm.generate_continuation(np.zeros(72000, np.float32), ["x"])


def test_story_mode_switches_conditioning_at_the_boundaries(musiclm, monkeypatch):
    calls = []
    original = Stage.sample

    def spy(self, prefix, steps, prompt_length, keys, params, temperature):
        calls.append((self.name, np.array(prefix), steps, prompt_length))
        return original(self, prefix, steps, prompt_length, keys, params, temperature)
    monkeypatch.setattr(Stage, "sample", spy)
    musiclm.set_generation_params(seed=2, guidance_scale=1.0)
    before, settings = dict(vars(musiclm)), musiclm.params
    audio = musiclm.generate_story([("calm piano", 1.0), ("loud rock drums", 1.2)])
    assert audio.shape == (1, int(2.2 * 24000)) and musiclm.params == settings  # settings untouched
    assert vars(musiclm) == before  # nothing of the call is kept on the object
    first, second = musiclm.mulan.tokens_from_text(["calm piano", "loud rock drums"])
    for stage, levels, boundary in (("semantic", 1, 25), ("coarse", 2, 50)):
        layout = musiclm.stages[stage].model.layout
        filled = 0
        windows = [c for c in calls if c[0] == stage]
        assert len(windows) >= 2
        for _, prefix, steps, prompt_length in windows:
            new_frames = steps // levels
            crosses = filled < boundary < filled + new_frames
            assert not crosses, f"{stage}: a window's new frames {filled}-{filled + new_frames} cross {boundary}"
            want = first if filled < boundary else second
            np.testing.assert_array_equal(prefix[:, :12], layout.to_global(want[None], "mulan"))
            filled += new_frames
        assert filled == (55 if stage == "semantic" else 110)


def test_cli_writes_wavs_samples_and_a_report_that_references_them(model_dirs, tmp_path):
    import json
    import re

    import soundfile

    from musiclm_jax import generate
    out = tmp_path / "samples"
    melody_file = tmp_path / "melody.wav"
    t = np.arange(12000) / 24000
    soundfile.write(melody_file, np.concatenate([0.3 * np.sin(2 * np.pi * f * t) for f in (261.63, 329.63, 392.0)]),
                    24000)
    bindings = [f"--gin.{name.upper()}_CHECKPOINT='{model_dirs / name}'"
                for name in ("mulan", "codec", "semantic", "coarse", "fine")]
    generate.main(["--gin_file=gin/sample/musiclm.gin", *bindings, "--prompt", "calm piano",
                   "--prompt", "loud rock drums", "--duration", "1.5", "--seed", "7", "--guidance", "2.0",
                   "--rerank", "2", f"--melody={melody_file}", f"--output_dir={out}"])
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert [s["prompt"] for s in samples] == ["calm piano", "loud rock drums"]
    for s in samples:
        audio, rate = soundfile.read(out / s["wav"])
        assert rate == 24000 and len(audio) == 36000 and s["seed"] == 7
        assert s["settings"]["guidance_scale"] == 2.0 and -1.0 <= s["mulan_score"] <= 1.0
        assert s["settings"]["melody_tokens"] == "C C E E E G G"  # 1.5 s of C, E, G: 7 whole 200 ms frames
        assert s["settings"]["rerank"] == 2
        assert abs(max(s["settings"]["candidate_mulan_scores"]) - s["mulan_score"]) < 1e-4
        assert (out / s["spectrogram"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    referenced = re.findall(r'(?:src)="([^"]+)"', page)
    assert sorted(referenced) == sorted([s["wav"] for s in samples] + [s["spectrogram"] for s in samples])
    assert all((out / r).exists() for r in referenced) and "calm piano" in page
    with pytest.raises(Exception, match="unknown flag --promt"):
        generate.main(["--gin_file=gin/sample/musiclm.gin", "--promt", "x"])


def test_generation_keeps_nothing_on_the_object_and_takes_settings_per_call(musiclm):
    """Results are returned, not stored; `params=` sets one call's settings without changing the defaults, and
    gives what set_generation_params would."""
    musiclm.set_generation_params(duration_s=1.0, seed=3, guidance_scale=1.0)
    before = dict(vars(musiclm))
    result = musiclm.generate(["a quiet harp"], return_details=True)
    assert vars(musiclm) == before and result.params == musiclm.params and result.scores is None
    # 0.5 s is 12.5 semantic frames: 13 are generated and the audio is cut to exactly 0.5 s.
    other = musiclm.generation_params(seed=9, duration_s=0.5)
    assert (other.seed, other.duration_s, other.guidance_scale) == (9, 0.5, 1.0)
    per_call = musiclm.generate(["a quiet harp"], params=other, return_details=True)
    assert vars(musiclm) == before and musiclm.params.seed == 3 and per_call.audio.shape == (1, 12000)
    assert per_call.tokens["semantic"].shape == (1, 13) and per_call.tokens["codes"].shape == (1, 26, 4)
    per_call = per_call.audio
    musiclm.set_generation_params(seed=9, duration_s=0.5)
    np.testing.assert_array_equal(musiclm.generate(["a quiet harp"]), per_call)
    with pytest.raises(ValueError, match="duration_s=0 must be positive"):
        musiclm.generation_params(duration_s=0)


def test_the_semantic_rate_comes_from_the_coarse_stage_and_must_agree_with_the_tokenizer(musiclm,
                                                                                        melody_coarse_dir):
    """The tiny coarse stage holds 50 semantic tokens and 100 frames of codes (50 Hz) per window: 25 Hz, with no
    setting; a rate given beside it (a served manifest) or a tokenizer at another rate is refused."""
    from musiclm_jax.generation.stage_sampling import coarse_codec_frames_per_semantic_frame
    assert musiclm.semantic_rate == 25.0 and musiclm.ratio == 2
    assert musiclm.semantic_tokenizer.frame_rate == 25.0
    melody_coarse = Stage.from_checkpoint(str(melody_coarse_dir), "coarse")
    assert coarse_codec_frames_per_semantic_frame(melody_coarse.model) == 2  # MuLan + 50 (melody, semantic) pairs
    stages = [musiclm.stages[n] for n in ("semantic", "coarse", "fine")]
    assert MusicLM(musiclm.mulan, musiclm.codec, *stages, log=None, semantic_rate=25.0).semantic_rate == 25.0
    with pytest.raises(ValueError, match=r"semantic_rate 50.0 Hz != 25.0 Hz, the rate of the coarse stage"):
        MusicLM(musiclm.mulan, musiclm.codec, *stages, log=None, semantic_rate=50.0)

    class OtherRate:
        frame_rate = 12.5
    with pytest.raises(ValueError, match=r"the semantic tokenizer's frame_rate 12.5 Hz != 25.0 Hz"):
        MusicLM(musiclm.mulan, musiclm.codec, *stages, log=None, semantic_tokenizer=OtherRate())
