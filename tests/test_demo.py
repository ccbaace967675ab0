"""The demo (`python -m musiclm_jax.demo`, the README's main job): its steps are the project's own commands with
valid gin, a re-run skips finished steps, and its quality figure is the MuLan similarity it says it is. (The
whole demo takes ~19 minutes here, so CI runs its parts; its figures are in the README.)"""
import itertools
import json

import gin
import numpy as np
import pytest

from helpers import harmonic_notes
from musiclm_jax import demo, generate, gin_utils, recipe, run_directory
from musiclm_jax.mulan import inference as mulan
from musiclm_jax.mulan import text_vocab
from musiclm_jax.data import audio_io


def test_every_step_is_a_command_of_the_project_with_valid_gin(tmp_path):
    plan = demo.steps(str(tmp_path), ["calm piano"], 4.0, 0)
    assert [name for name, _ in plan] == ["codec", "w2v_bert", "semantic_tokens", "mulan", "mulan_rvq", "tokenize",
                                          "semantic_stage", "coarse_stage", "fine_stage", "generate"]
    for name, argv in plan:
        module, args = argv[0], argv[1:]
        __import__(module)
        if name == "mulan_rvq":
            assert "--gin_file=gin/mulan/rvq_tiny.gin" in args  # 12 x 32, as gin/tokenize/aot_tiny.gin reads it
        own = generate.FLAGS if name == "generate" else None
        flags = gin_utils.parse_flags(args, own)
        gin_utils.parse_gin(flags["gin_files"], flags["gin_bindings"], finalize=True)  # every REQUIRED macro set
        gin.clear_config()
    # The stages read the tokenize step's cache, and sampling names the trained run directories.
    assert all(f"--gin.TOKEN_DIR='{tmp_path / 'tokens'}'" in argv for name, argv in plan if name.endswith("_stage"))
    sample = dict(plan)["generate"]
    for stage in ("semantic", "coarse", "fine", "mulan", "codec"):
        assert f"--gin.{stage.upper()}_CHECKPOINT='{tmp_path / stage}'" in sample


def test_a_rerun_skips_finished_steps(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(recipe, "run_step", lambda name, *args: ran.append(name))
    monkeypatch.setattr(demo, "evaluate", lambda out, seed: ran.append("evaluate") or {
        "matched_mean": 0.5, "shuffled_mean": 0.1, "prompts_above_shuffled": 4, "num_prompts": 4})
    monkeypatch.setattr(demo, "melody_following", lambda out, duration, seed: {
        "agreement_with_melody": 0.5, "agreement_without_melody": 0.2, "agreement_with_other_melody": 0.2,
        "chance": 1 / 12, "chroma_cqt_agreement_with_melody": 0.4, "chroma_cqt_agreement_without_melody": 0.1,
        "chroma_cqt_agreement_with_other_melody": 0.1})
    monkeypatch.setattr(demo, "key_accuracy", lambda out: {
        "num_prompts": 2, "key_accuracy": 0.5, "chance": 1 / 24, "estimator_accuracy_on_references": 0.9})
    monkeypatch.setattr(demo, "codec_checks", lambda out: {
        "tones_hz": [55.0, 4000.0], "max_abs_cents": 20.0, "silence_dbfs": -80.0, "dc_offset": 1e-4})
    result = demo.main(["--output_dir", str(tmp_path)])
    assert ran == [name for name, _ in demo.steps(str(tmp_path), ["x"], 4.0, 0)] + ["evaluate"]
    assert set(result["timings"]) == set(ran) | {"total"}
    ran.clear()
    demo.main(["--output_dir", str(tmp_path)])
    assert ran == []
    (tmp_path / "fine").mkdir()
    (tmp_path / "fine" / "checkpoint").write_text("a finished run")
    (tmp_path / "coarse").mkdir()
    demo.main(["--output_dir", str(tmp_path), "--redo", "fine_stage"])
    assert ran == ["fine_stage"]
    assert not (tmp_path / "fine").exists() and (tmp_path / "coarse").exists()  # starts over, the others kept
    assert {n for n, _ in demo.steps(str(tmp_path), ["x"], 4.0, 0)} - set(recipe.STEP_OUTPUTS) == {"mulan_rvq"}
    assert json.loads((tmp_path / "quality.json").read_text())["matched_mean"] == 0.5
    assert json.loads((tmp_path / "quality.json").read_text())["codec_sanity"]["max_abs_cents"] == 20.0
    with pytest.raises(SystemExit, match="no such step"):
        demo.main(["--output_dir", str(tmp_path), "--redo", "fine"])


def test_quality_is_the_mulan_similarity_of_own_against_shuffled_pairs(tmp_path):
    mulan_dir = tmp_path / "mulan"
    run_directory.write_run_directory(str(mulan_dir), "gin/mulan/tiny.gin", [], seed=2)
    text_vocab.ensure_vocabulary(str(mulan_dir), "synthetic_music_16000hz", 512, max_captions=500)
    samples = tmp_path / "samples"
    samples.mkdir()
    prompts = ["calm piano", "loud rock drums", "a synth lead"]
    rng = np.random.RandomState(0)
    with open(samples / "samples.jsonl", "w") as f:
        for i, prompt in enumerate(prompts):
            audio_io.save_audio(str(samples / f"{i}.wav"), 0.1 * rng.randn(24000).astype(np.float32), 24000)
            f.write(json.dumps({"prompt": prompt, "wav": f"{i}.wav"}) + "\n")
    quality = demo.evaluate(str(tmp_path))
    model = mulan.MuLan.from_checkpoint(str(mulan_dir))
    clips = np.stack([audio_io.load_audio(str(samples / f"{i}.wav"), 16000) for i in range(3)])
    sim = model.similarity(prompts, clips)
    assert quality["num_prompts"] == 3 and quality["prompts"] == prompts
    assert quality["matched_mean"] == pytest.approx(np.mean(np.diag(sim)), abs=1e-5)
    assert quality["shuffled_mean"] == pytest.approx((sim.sum() - np.trace(sim)) / 6, abs=1e-5)
    perms = list(itertools.permutations(range(3)))
    assert quality["permutation_p_value"] == pytest.approx(
        np.mean([np.mean(sim[range(3), p]) >= np.trace(sim) / 3 - 1e-9 for p in perms]), abs=1e-9)
    assert quality["prompts_above_shuffled"] == sum(
        sim[i, i] > np.mean([sim[i, j] for j in range(3) if j != i]) for i in range(3))


def test_permutation_p_value_counts_pairings_at_least_as_close_as_the_matched_one():
    assert demo.permutation_p_value(np.eye(3)) == pytest.approx(1 / 6)  # only the identity reaches mean 1
    assert demo.permutation_p_value(np.eye(8)) == pytest.approx(1 / 40320)
    assert demo.permutation_p_value(np.ones((4, 4))) == 1.0  # every pairing ties
    assert demo.permutation_p_value(1 - np.eye(4)) == 1.0  # the matched pairs are the farthest
    sampled = demo.permutation_p_value(np.eye(10), samples=20_000)  # past max_exact: seeded random pairings
    assert sampled == pytest.approx(1 / 20_000) and demo.permutation_p_value(np.ones((10, 10)), samples=500) == 1.0
    with pytest.raises(ValueError, match="square matrix"):
        demo.permutation_p_value(np.ones((2, 3)))


def test_key_accuracy_compares_the_estimated_key_with_the_key_the_prompt_names(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    c_major = harmonic_notes([60, 64, 67, 72, 65, 69, 60, 67, 71, 74, 60, 64, 67], 0.3)
    a_minor = harmonic_notes([57, 60, 64, 69, 62, 65, 69, 57, 64, 68, 71, 57, 60, 64], 0.3)
    rows = [("a calm tune in C major", c_major), ("a sad tune in A minor", a_minor),
            ("a tune in Eb major", c_major),  # named wrongly: the audio is in C major
            ("drums without a key", a_minor)]  # names no key: not counted
    with open(samples / "samples.jsonl", "w") as f:
        for i, (prompt, audio) in enumerate(rows):
            audio_io.save_audio(str(samples / f"{i}.wav"), audio, 24000)
            f.write(json.dumps({"prompt": prompt, "wav": f"{i}.wav"}) + "\n")
    key = demo.key_accuracy(str(tmp_path), reference_clips=8)
    assert key["num_prompts"] == 3
    assert key["named"] == ["C major", "A minor", "Eb major"]
    assert key["estimated"] == ["C major", "A minor", "C major"]
    assert key["key_accuracy"] == pytest.approx(2 / 3) and key["tonic_accuracy"] == pytest.approx(2 / 3)
    assert key["chance"] == pytest.approx(1 / 24)
    # The estimator on the synthetic clips it is checked against (their rendered keys) is far above chance.
    assert key["estimator_accuracy_on_references"] >= 0.5


def test_clip_standard_error_is_that_of_the_per_clip_agreements():
    reference = np.zeros((3, 4), np.int32)
    generated = np.array([[0, 0, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])  # per clip: 1, 0.5, 0 over 4 frames
    pitched = np.ones((3, 4), bool)
    assert demo.clip_standard_error(generated, reference, pitched) == pytest.approx(0.5 / np.sqrt(3))
    pitched[2] = False  # a clip without a pitched frame is left out: agreements 1 and 0.5
    assert demo.clip_standard_error(generated, reference, pitched) == pytest.approx(np.std([1, 0.5], ddof=1) / 2 ** 0.5)
    pitched[1] = False
    assert np.isnan(demo.clip_standard_error(generated, reference, pitched))
