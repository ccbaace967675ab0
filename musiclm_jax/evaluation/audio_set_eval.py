"""The field's metrics for any folder of generated audio against any folder of reference audio:

    python -m musiclm_jax.eval --gin_file=gin/eval/audio_sets.gin \
        --gin.GENERATED_DIR="'/out/generated'" --gin.REFERENCE_DIR="'/data/reference'" \
        --gin.VGGISH_CHECKPOINT="'/ckpt/vggish'" --gin.PASST_CHECKPOINT="'/ckpt/passt'" \
        --gin.CLAP_CHECKPOINT="'/ckpt/clap'" [--gin.MULAN_CHECKPOINT="'/ckpt/mulan'"] [--gin.OUTPUT_DIR="'/out'"]

For comparing systems other than this one (their output folders), with the same conventions as the generation
evaluation (generation_eval's module docstring names the reference implementation of each):

- `fad_vggish` (VGGISH_CHECKPOINT): Fréchet distance of the two sets of VGGish frame embeddings (every whole
  0.96 s of every file is one sample, as frechet-audio-distance and fadtk pool them; files shorter than one
  0.975 s example give none and are counted in `fad_vggish_short_files`, reference then generated). Sets, not pairs: the
  folders may hold different numbers of files.
- `kl_passt` (PASST_CHECKPOINT): audiocraft's PaSST KL over the *pairs*: a generated file and the reference file
  with the same relative path without its extension (`a/b.wav` pairs with `a/b.flac`). Both are cut to the
  shorter one's length (audiocraft compares equal-length batches), then cut into 10 s segments at 32 kHz; every
  segment pair is a row of `generation_metrics.audiocraft_kl`. Files without a partner are counted
  (`unpaired_generated`, `unpaired_reference`) and left out of the KL only.
- `clap_score` (CLAP_CHECKPOINT) and `mulan_cycle_consistency` (MULAN_CHECKPOINT): the mean cosine between each
  generated file's audio embedding and its caption's text embedding. Captions come from GENERATED_DIR's
  captions.jsonl (the audio-folder format: one {"audio_path": ..., "caption": ...} per line); uncaptioned files
  are counted (`uncaptioned_generated`) and left out of these two only.

A metric whose model is not given, or that has nothing to compare, is listed in `skipped_metrics` with the
reason. Files that cannot be decoded are skipped and counted by reason (`skipped`), never silently. Also:
`num_generated`, `num_reference`, `num_pairs`, `max_seconds`.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import numpy as np

from musiclm_jax.data import audio_io, captioned_audio
from musiclm_jax.data.bad_input import BadInputReport
from musiclm_jax.evaluation import generation_metrics

NO_CARVE = captioned_audio.HeldOutCarve(validation_fraction=0.0, test_fraction=0.0)


def _records(directory: str, what: str, report: BadInputReport, exclude: Optional[str]):
    """{pairing key: AudioRecord} of the audio files under `directory` (not under `exclude`); the key is the
    relative path without its extension."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{what} {directory!r} is not a directory")
    checks = captioned_audio.AudioChecks(sample_rate=16000, held_out=NO_CARVE)
    records = {}
    for record in captioned_audio.read_audio_folder(directory, checks, report):
        if exclude and os.path.abspath(record.path).startswith(os.path.abspath(exclude) + os.sep):
            continue
        key = os.path.splitext(record.id)[0]
        if key in records:
            report.bad("duplicate_name", record.path, f"pairs by name without extension, and {records[key].path} "
                                                      f"has the same")
            continue
        records[key] = record
    return records


class _Clips:
    """Decoded clips of a set of records, mono at any model's rate, cached per rate; undecodable files are counted
    in `report` once and dropped."""

    def __init__(self, records: dict, report: BadInputReport, max_seconds: Optional[float]):
        self.records, self.report, self.max_seconds = dict(records), report, max_seconds
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def at(self, rate: int) -> dict[str, np.ndarray]:
        if rate not in self._cache:
            clips = {}
            for key, record in list(self.records.items()):
                try:
                    clips[key] = audio_io.load_audio(record.path, rate, self.max_seconds)
                except audio_io.AudioDecodeError as e:
                    self.report.bad(e.reason, record.path, str(e).split(": ", 1)[-1])
                    del self.records[key]
                    for cached in self._cache.values():
                        cached.pop(key, None)
            self._cache[rate] = clips
        return {k: v for k, v in self._cache[rate].items() if k in self.records}


def _vggish_frames(embedder, clips: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
    """(the VGGish frames [n, 128] float64 of clips at the embedder's rate, how many clips were shorter than one
    0.975 s example and gave none)."""
    long_enough = [c for c in clips.values() if len(c) >= embedder.model.network.example_samples]
    frames = [embedder.embed(clip, embedder.sample_rate) for clip in long_enough]
    return (np.concatenate(frames).astype(np.float64) if frames else np.zeros((0, 128)),
            len(clips) - len(long_enough))


def evaluate_audio_sets(checkpoint_dir: str, output_dir: str, *, generated_dir: str, reference_dir: str,
                        vggish_checkpoint: Optional[str] = None, passt_checkpoint: Optional[str] = None,
                        clap_checkpoint: Optional[str] = None, mulan_checkpoint: Optional[str] = None,
                        max_seconds: Optional[float] = None, batch_size: int = 16) -> dict:
    """The metrics of the module docstring for generated_dir against reference_dir.

    Args:
      checkpoint_dir: recorded by eval.evaluate (gin/eval/audio_sets.gin passes GENERATED_DIR).
      output_dir: where metrics.json goes; files under it are not read as generated audio.
      vggish_checkpoint, passt_checkpoint, clap_checkpoint, mulan_checkpoint: converted run directories
        (`python -m musiclm_jax.convert vggish|passt|clap`, or a MuLan run directory); None skips the metric.
      max_seconds: only this much of each file is read (None: all).
      batch_size: clips per PaSST forward pass.
    """
    del checkpoint_dir
    report = BadInputReport("skip", f"audio sets {generated_dir} vs {reference_dir}")
    generated = _Clips(_records(generated_dir, "GENERATED_DIR", report, output_dir), report, max_seconds)
    reference = _Clips(_records(reference_dir, "REFERENCE_DIR", report, output_dir), report, max_seconds)
    metrics: dict = {"max_seconds": max_seconds}
    skipped: dict[str, str] = {}

    if vggish_checkpoint is None:
        skipped["fad_vggish"] = "no VGGISH_CHECKPOINT given (python -m musiclm_jax.convert vggish)"
    else:
        from musiclm_jax.evaluation.vggish_model import VGGishEmbedder
        embedder = VGGishEmbedder.from_checkpoint(vggish_checkpoint)
        rate = embedder.sample_rate
        (ref_frames, ref_short), (gen_frames, gen_short) = (_vggish_frames(embedder, clips.at(rate))
                                                            for clips in (reference, generated))
        sets = [ref_frames, gen_frames]
        metrics["fad_vggish_short_files"] = [ref_short, gen_short]  # shorter than one example: no frame
        if min(len(s) for s in sets) < 2:
            skipped["fad_vggish"] = (f"fewer than 2 VGGish frames (0.96 s each) in a set: reference {len(sets[0])}, "
                                     f"generated {len(sets[1])}")
        else:
            metrics["fad_vggish"] = generation_metrics.frechet_audio_distance(*sets)
            metrics["fad_vggish_frames"] = [len(sets[0]), len(sets[1])]

    if passt_checkpoint is None:
        skipped["kl_passt"] = "no PASST_CHECKPOINT given (python -m musiclm_jax.convert passt)"
    else:
        from musiclm_jax.evaluation.passt_model import PaSSTClassifier
        classifier = PaSSTClassifier.from_checkpoint(passt_checkpoint)
        rate = classifier.sample_rate
        ref, gen = reference.at(rate), generated.at(rate)
        pairs = sorted(set(ref) & set(gen))
        rows_ref, rows_gen = [], []
        for key in pairs:
            length = min(len(ref[key]), len(gen[key]))
            for side, clips in ((rows_ref, ref), (rows_gen, gen)):
                side.append(classifier.segment_rows(clips[key][None, :length], rate, batch_size))
        rows = [np.concatenate(r) if r else np.zeros((0, 1)) for r in (rows_ref, rows_gen)]
        if not len(rows[0]):
            skipped["kl_passt"] = "no pair of files with the same name (without extension) longer than 0.15 s"
        else:
            metrics["kl_passt"] = generation_metrics.audiocraft_kl(*rows)
            metrics["kl_passt_segments"] = len(rows[0])
        metrics["num_pairs"] = len(pairs)
        metrics["unpaired_generated"] = len(set(gen) - set(ref))
        metrics["unpaired_reference"] = len(set(ref) - set(gen))

    captions = {key: r.caption for key, r in generated.records.items() if r.caption}
    metrics["uncaptioned_generated"] = len(generated.records) - len(captions)
    for name, checkpoint, setting in (("clap_score", clap_checkpoint, "CLAP_CHECKPOINT"),
                                      ("mulan_cycle_consistency", mulan_checkpoint, "MULAN_CHECKPOINT")):
        if checkpoint is None:
            skipped[name] = f"no {setting} given"
            continue
        from musiclm_jax.mulan.inference import MuLan
        model = MuLan.from_checkpoint(checkpoint)
        clips = generated.at(model.sample_rate)
        keys = sorted(k for k in captions if k in clips)
        if not keys:
            skipped[name] = f"no captioned generated file ({os.path.join(generated_dir, 'captions.jsonl')})"
            continue
        audio = np.stack([model.embed_audio(clips[k]) for k in keys])
        metrics[name] = generation_metrics.mulan_cycle_consistency(model.embed_text([captions[k] for k in keys]),
                                                                   audio)
        metrics[f"{name}_clips"] = len(keys)

    metrics["num_generated"], metrics["num_reference"] = len(generated.records), len(reference.records)
    metrics["num_skipped"], metrics["skipped"] = report.num_skipped, dict(sorted(report.skipped.items()))
    if skipped:
        metrics["skipped_metrics"] = skipped
    if report.num_skipped:
        report.print_summary()
    print(f"audio sets: {metrics['num_generated']} generated, {metrics['num_reference']} reference files",
          file=sys.stderr)
    return metrics
