"""The field's metrics end to end on tiny random-init models (no torch): gin/eval/musiccaps.gin generating for a
small folder in the MusicCaps layout, and gin/eval/audio_sets.gin on two folders, each value checked against a
direct computation with the same models (the models' own equality with the reference packages is tested in
test_vggish.py, test_passt.py and test_convert_clap.py)."""
import json

import numpy as np
import pytest
import soundfile

from helpers import write_tiny_evaluation_models, write_tiny_run_directories
from musiclm_jax import eval as eval_lib
from musiclm_jax.data import audio_io
from musiclm_jax.evaluation import generation_metrics
from musiclm_jax.mulan.inference import MuLan
from musiclm_jax.evaluation.passt_model import PaSSTClassifier
from musiclm_jax.evaluation.vggish_model import VGGishEmbedder

CHECKPOINTS = ("mulan", "codec", "semantic", "coarse", "fine")
MACROS = ("MULAN_CHECKPOINT", "CODEC_CHECKPOINT", "SEMANTIC_CHECKPOINT", "COARSE_CHECKPOINT", "FINE_CHECKPOINT")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("field_models")
    write_tiny_run_directories(root)
    return {"root": root, **write_tiny_evaluation_models(root)}


def _tone(seconds, rate, freq, seed, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.RandomState(seed)
    mono = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.randn(t.size)
    return np.stack([mono, 0.5 * mono], axis=1) if channels == 2 else mono


def test_musiccaps_task_end_to_end(models, tmp_path):
    """Four is_audioset_eval rows (one clip missing) and one training row; 2 s per clip: the metrics the field
    reports, the published figures in the report."""
    mc = tmp_path / "musiccaps"
    mc.mkdir()
    rows = ["ytid,start_s,end_s,audioset_positive_labels,aspect_list,caption,author_id,is_balanced_subset,"
            "is_audioset_eval"]
    for i, (caption, is_eval) in enumerate([("a calm piano melody", True), ("loud rock drums and guitar", True),
                                            ("a slow string quartet", True), ("missing clip", True),
                                            ("training only", False)]):
        rows.append(f"clip{i},0,10,/m/0,\"['x']\",{caption},1,False,{is_eval}")
        if caption != "missing clip":
            soundfile.write(str(mc / f"clip{i}.wav"), _tone(3.0, 44100, 220 * (i + 1), i, channels=2), 44100)
    (mc / "musiccaps-public.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    argv = ["--gin_file=gin/eval/musiccaps.gin", f"--gin.EVAL_DATA='musiccaps:{mc}'", f"--gin.OUTPUT_DIR='{out}'",
            f"--gin.VGGISH_CHECKPOINT='{models['vggish']}'", f"--gin.PASST_CHECKPOINT='{models['passt']}'",
            f"--gin.CLAP_CHECKPOINT='{models['root'] / 'mulan'}'", "--gin.DURATION_S=2.0", "--gin.BATCH_SIZE=2",
            "--gin.generation_eval.evaluate_generation.report_samples=1"]
    argv += [f"--gin.{m}='{models['root'] / n}'" for m, n in zip(MACROS, CHECKPOINTS)]
    eval_lib.main(argv)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_examples"] == 3 and metrics["num_skipped"] == 1
    for key in ("fad_vggish", "kl_passt", "clap_score", "mulan_cycle_consistency"):
        assert np.isfinite(metrics[key]), key
    assert metrics["fad_vggish"] > 0 and -1 <= metrics["clap_score"] <= 1
    assert set(metrics["skipped_metrics"]) == {"memorization"}
    page = (out / "report.html").read_text()
    assert "Published figures on MusicCaps" in page and "arXiv 2306.05284" in page and "arXiv 2301.11325" in page
    # kl_passt from the written files: the references are the MusicCaps clips at the codec's rate, cut to 2 s.
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    rate = 24000
    generated = np.stack([audio_io.load_audio(str(out / s["wav"]), rate) for s in samples])
    reference = np.stack([audio_io.load_audio(str(mc / f"{s['reference_id']}.wav"), rate, max_seconds=2.0)
                          for s in samples])
    passt = PaSSTClassifier.from_checkpoint(models["passt"])
    p, q = (np.stack([passt.probabilities(a, rate) for a in x]) for x in (reference, generated))
    assert metrics["kl_passt"] == pytest.approx(generation_metrics.audiocraft_kl(p, q), rel=1e-4, abs=1e-6)


def test_audio_sets_on_two_folders(models, tmp_path):
    """Generated: 4 decodable files (WAV and FLAC, 16 and 22.05 kHz, stereo), a broken one, 3 captions.
    Reference: 3 files pairing by name without extension (one FLAC), one unpaired. Each metric against the
    direct computation; counts of files, pairs and skips."""
    gen, ref = tmp_path / "generated", tmp_path / "reference"
    (gen / "sub").mkdir(parents=True)
    ref.mkdir()
    soundfile.write(str(gen / "a.wav"), _tone(2.5, 16000, 330, 0), 16000)
    soundfile.write(str(gen / "b.flac"), _tone(3.0, 22050, 440, 1, channels=2), 22050)
    soundfile.write(str(gen / "sub" / "c.wav"), _tone(2.0, 16000, 550, 2), 16000)
    soundfile.write(str(gen / "d.wav"), _tone(1.5, 16000, 660, 3), 16000)
    (gen / "broken.wav").write_bytes(b"not audio")
    (gen / "captions.jsonl").write_text("\n".join(json.dumps({"audio_path": p, "caption": c}) for p, c in [
        ("a.wav", "a calm piano melody"), ("b.flac", "loud rock drums"), ("sub/c.wav", "a slow string quartet")]))
    soundfile.write(str(ref / "a.flac"), _tone(3.0, 16000, 300, 10), 16000)
    soundfile.write(str(ref / "b.wav"), _tone(2.0, 32000, 400, 11), 32000)
    (ref / "sub").mkdir()
    soundfile.write(str(ref / "sub" / "c.wav"), _tone(2.0, 16000, 500, 12), 16000)
    soundfile.write(str(ref / "e.wav"), _tone(2.0, 16000, 700, 13), 16000)
    out = tmp_path / "out"
    result = eval_lib.main([
        "--gin_file=gin/eval/audio_sets.gin", f"--gin.GENERATED_DIR='{gen}'", f"--gin.REFERENCE_DIR='{ref}'",
        f"--gin.OUTPUT_DIR='{out}'", f"--gin.VGGISH_CHECKPOINT='{models['vggish']}'",
        f"--gin.PASST_CHECKPOINT='{models['passt']}'", f"--gin.CLAP_CHECKPOINT='{models['root'] / 'mulan'}'"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    assert metrics["num_generated"] == 4 and metrics["num_reference"] == 4
    assert metrics["num_skipped"] == 1 and sum(metrics["skipped"].values()) == 1
    assert metrics["num_pairs"] == 3 and metrics["unpaired_generated"] == 1 and metrics["unpaired_reference"] == 1
    assert metrics["uncaptioned_generated"] == 1 and metrics["clap_score_clips"] == 3
    assert set(metrics["skipped_metrics"]) == {"mulan_cycle_consistency"}

    def load(folder, names, rate):
        return [audio_io.load_audio(str(folder / n), rate) for n in names]
    gen_names, ref_names = ["a.wav", "b.flac", "d.wav", "sub/c.wav"], ["a.flac", "b.wav", "e.wav", "sub/c.wav"]
    vggish = VGGishEmbedder.from_checkpoint(models["vggish"])
    sets = [np.concatenate([vggish.embed(a, 16000) for a in load(folder, names, 16000)])
            for folder, names in ((ref, ref_names), (gen, gen_names))]
    assert metrics["fad_vggish_frames"] == [len(sets[0]), len(sets[1])] == [9, 8]
    assert metrics["fad_vggish_short_files"] == [0, 0]
    assert metrics["fad_vggish"] == pytest.approx(generation_metrics.frechet_audio_distance(*sets), rel=1e-6)

    passt = PaSSTClassifier.from_checkpoint(models["passt"])
    pairs = [(r, g) for r, g in zip(load(ref, ["a.flac", "b.wav", "sub/c.wav"], 32000),
                                    load(gen, ["a.wav", "b.flac", "sub/c.wav"], 32000))]
    p = np.stack([passt.probabilities(r[:min(len(r), len(g))], 32000) for r, g in pairs])
    q = np.stack([passt.probabilities(g[:min(len(r), len(g))], 32000) for r, g in pairs])
    assert metrics["kl_passt_segments"] == 3
    assert metrics["kl_passt"] == pytest.approx(generation_metrics.audiocraft_kl(p, q), rel=1e-4, abs=1e-6)

    clap = MuLan.from_checkpoint(str(models["root"] / "mulan"))
    audio = np.stack([clap.embed_audio(a) for a in load(gen, ["a.wav", "b.flac", "sub/c.wav"], clap.sample_rate)])
    text = clap.embed_text(["a calm piano melody", "loud rock drums", "a slow string quartet"])
    assert metrics["clap_score"] == pytest.approx(float(np.mean(np.sum(audio * text, axis=1))), abs=1e-5)


def test_audio_sets_name_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="REFERENCE_DIR"):
        eval_lib.main(["--gin_file=gin/eval/audio_sets.gin", f"--gin.GENERATED_DIR='{tmp_path}'",
                       f"--gin.REFERENCE_DIR='{tmp_path / 'nope'}'"])


def test_passt_and_vggish_batches_run_over_every_device(models):
    """Evaluation batches are padded to the data-parallel size and laid over all devices (8 here), with the same
    outputs as on one device."""
    import jax

    from musiclm_jax import partitioning
    one_device = partitioning.Partitioner(partitioning.create_mesh(devices=jax.devices()[:1]))
    rng = np.random.RandomState(0)
    audio = (0.1 * rng.randn(3, 32000)).astype(np.float32)
    passt = PaSSTClassifier.from_checkpoint(models["passt"])
    rows, n = passt.partitioner.pad_and_shard(audio)
    assert n == 3 and rows.shape == (jax.device_count(), 32000)
    assert len(rows.sharding.device_set) == jax.device_count() == 8
    single = PaSSTClassifier(passt.model, jax.device_get(passt.params), one_device)
    np.testing.assert_allclose(passt.batch_logits(audio, 32000), single.batch_logits(audio, 32000), atol=1e-5)
    vggish = VGGishEmbedder.from_checkpoint(models["vggish"])
    single = VGGishEmbedder(vggish.model, jax.device_get(vggish.params), None, one_device)
    got = vggish.embed_batch(audio, 32000)
    assert got.shape == (3, 1, 128)  # 1 s: one 0.96 s example
    np.testing.assert_allclose(got, single.embed_batch(audio, 32000), atol=1e-4)
