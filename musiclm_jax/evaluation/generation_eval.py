"""Generation evaluation: text -> music on held-out captions, scored against their reference clips.

    python -m musiclm_jax.eval --gin_file=gin/eval/generation.gin --gin.MULAN_CHECKPOINT="'/ckpt/mulan'" ... \
        [--gin.EVAL_DATA="'musiccaps:/data/musiccaps'"] [--gin.TOKEN_DIR="'/data/tokens'"] [--gin.OUTPUT_DIR=...]

`evaluate_generation` generates audio for every caption of the eval set (in batches of `batch_size`, batch b with
seed `seed + b`; the last batch is padded with repeated captions so every batch has one compiled shape), writes
the clips as 16-bit wavs and computes every metric on the audio read back from those files, so the numbers can be
recomputed from the output directory. Output (in OUTPUT_DIR, next to eval.evaluate's metrics.json):

    generated/<index>_<caption>.wav    every generated clip, at the codec's rate
    reference/<index>_<caption>.wav    the reference clips of the samples shown in the report
    *.png                              their log-mel spectrograms
    samples.jsonl                      one line per caption: caption, reference id, wav, the MuLan cosine of
                                       caption and audio, the classifier's top labels for both clips
    report.html                        settings, the metrics table and the first `report_samples` samples

Eval sets (`eval_data`): None or 'synthetic' (the embedded synthetic music's test split, the clips the codec and
MuLan evaluations use), 'audio_folder:DIR' (the `split` clips of an audio folder; captions required) or
'musiccaps:DIR' (DIR/musiccaps-public.csv and the clips {ytid}.<ext> in DIR; `is_audioset_eval` rows are the
`test` split). Reference clips are read at the codec's rate, cut to `duration_s` and zero-padded to it; bad files
are counted (`num_skipped`) and skipped.

Metrics (names carry the embedding model / classifier so values of different ones are not compared by mistake):

- `fad_<embedding>`: Fréchet Audio Distance (generation_metrics.frechet_audio_distance, squared embedding units)
  between clip embeddings of the reference and the generated clips. The embedding model is pluggable: anything
  with `embed(audio [B, samples], sample_rate) -> [B, D]` (`AudioEmbedder`), or a name (`EMBEDDING_MODELS`):
  'mulan' (a MuLan run directory's audio tower; default: the generating MuLan), 'clap' (a converted CLAP run
  directory, `python -m musiclm_jax.convert clap`; it is a MuLan run directory, so the same code), 'features'
  (a w2v-BERT or converted HuBERT/MERT run directory: layer `embedding_layer` averaged over time), 'vggish' (a
  converted VGGish run directory, `python -m musiclm_jax.convert vggish`: the field's FAD_VGG). An embedder may
  also return frame embeddings [B, frames, D]: every frame is then one sample of the set, which is how the
  field's FAD pools VGGish (one 128-d embedding per whole 0.96 s of each clip, last layer without ReLU, no PCA,
  as `frechet-audio-distance`'s defaults and fadtk's 'vggish'; audio resampled to 16 kHz).
- `kld_<classifier>`: mean KL(p_ref || p_gen) in nats between the class posteriors of each reference clip and the
  clip generated from its caption (generation_metrics.kld_from_audio). The classifier is pluggable: any
  `generation_metrics.Classifier` (`classifier(audio, sample_rate) -> probs [B, C]`), or a name (`CLASSIFIERS`):
  'mulan_zero_shot' (`MuLanZeroShotClassifier`), which needs no trained classifier and works offline: softmax
  over the cosines between the clip's MuLan audio embedding and the text embeddings of `class_labels`
  (default `DEFAULT_LABELS`: genres, instruments, moods, tempi), divided by `classifier_temperature`. The paper
  used an AudioSet (LEAF) classifier, which this project does not ship; plug one in through the interface.
- `kl_passt` (only with `passt_checkpoint`, a PaSST converted by `python -m musiclm_jax.convert passt`;
  otherwise listed in `skipped_metrics`): audiocraft's PaSST KL, the KL figure MusicGen and audiocraft report
  (audiocraft/metrics/kld.py, `PasstKLDivergenceMetric`): both clips resampled to 32 kHz, cut into consecutive
  10 s segments (the last one shorter, unpadded; segments of at most 0.15 s dropped), each segment's softmax over
  PaSST's 527 AudioSet logits a row, and `generation_metrics.audiocraft_kl` (KL(reference || generated + 1e-6),
  summed over classes, averaged over all segment pairs). A 10 s clip is one row.
- `mulan_cycle_consistency`: mean cosine between each caption's MuLan text embedding and the MuLan audio
  embedding of the clip generated from it (generation_metrics.mulan_cycle_consistency); `mcc_mulan_checkpoint`
  scores with another MuLan than the generating one (the generating one also conditions, so it is biased).
- `clap_score` (only with `clap_checkpoint`, a CLAP converted by `python -m musiclm_jax.convert clap`; otherwise
  listed in `skipped_metrics`): the same cosine with CLAP's text and audio towers, as audiocraft's
  `TextConsistencyMetric` (audiocraft/metrics/clap_consistency.py) computes the CLAP score MusicGen reports: each
  generated clip resampled to the CLAP's rate (48 kHz for LAION-CLAP) and downmixed, its unit-norm audio
  embedding against its caption's unit-norm text embedding, the cosines averaged over all clips. Clips shorter
  than CLAP's 10 s window are repeat-padded as LAION-CLAP and transformers' ClapFeatureExtractor do; longer ones
  are the normalised mean of 1 s-stride windows (mulan.MuLan.embed_audio), where LAION-CLAP's non-fused model
  embeds one random 10 s crop, so only clips of at most 10 s (MusicCaps') score exactly as audiocraft's.
- `memorization_*` (only with `token_dir`, a token cache of the training data written by musiclm_jax.tokenize;
  otherwise listed in `skipped_metrics` with the reason): the MusicLM paper's study of the semantic stage. For up
  to `memorization_examples` chunks of the cache's `memorization_split`, the stage is given the chunk's MuLan
  tokens (its training conditioning; the caption's text tokens if the cache has none), no melody, and the first
  `prompt_seconds` of its semantic tokens, and samples the next `continuation_seconds` (one window, with the
  generation's guidance scale and the semantic temperature unless `memorization_temperature` is set; example i
  draws from fold_in(key(seed), i)). Reported: `memorization_exact_match_fraction`,
  `memorization_approximate_match_fraction` (normalised Hamming distance <= `approximate_threshold`),
  `memorization_mean_token_agreement`, `memorization_chance_agreement` (1 / semantic vocabulary) and
  `memorization_num_examples` (generation_metrics.memorization).

Also `num_examples`, `num_skipped`, `duration_s`. The codec and MuLan evaluations run from the same entry point
with gin/eval/codec.gin and gin/eval/mulan.gin.

Pieces: evaluation/eval_data.py (the eval sets), evaluation/embedders.py (FAD's embedding models, KLD's
classifiers, the PaSST KL and the CLAP score), evaluation/memorization_eval.py (memorization) and
report.write_evaluation_report (report.html); this module generates and scores.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Optional, Sequence, Union

import numpy as np

from musiclm_jax.evaluation import report as report_lib
from musiclm_jax.data import audio_io, token_cache
from musiclm_jax.data.bad_input import BadInputReport
from musiclm_jax.evaluation import embedders, generation_metrics, memorization_eval
from musiclm_jax.evaluation import eval_data as eval_data_lib


def generate_all(musiclm, captions: Sequence[str], batch_size: int, seed: int, log=sys.stderr) -> np.ndarray:
    """[N, duration samples] for the captions, batch b generated with seed + b (the last batch padded)."""
    out = []
    start_time, previous_seed = time.time(), musiclm.params.seed
    for b, start in enumerate(range(0, len(captions), batch_size)):
        batch = list(captions[start:start + batch_size])
        real = len(batch)
        batch += [batch[-1]] * (batch_size - real)
        musiclm.set_generation_params(seed=seed + b)
        out.append(np.asarray(musiclm.generate(batch))[:real])
        if log is not None:
            print(f"generation eval: {start + real}/{len(captions)} captions generated "
                  f"({time.time() - start_time:.1f} s)", file=log)
    musiclm.set_generation_params(seed=previous_seed)
    return np.concatenate(out)


# Published figures on MusicCaps, shown beside ours in the report of a MusicCaps evaluation: (our metric, system,
# value as published, source). Only the FAD_VGG, PaSST KL and CLAP rows are computed the same way as ours;
# MusicLM's KLD used a LEAF AudioSet classifier and its MCC Google's MuLan.
PUBLISHED_MUSICCAPS = (
    ("fad_vggish", "MusicLM", "4.0", "arXiv 2301.11325, Table 1 (FAD_VGG)"),
    ("fad_vggish", "MusicGen (300M-3.3B)", "3.1-3.8", "arXiv 2306.05284, Table 1 (FAD_vgg)"),
    ("fad_vggish", "audiocraft's released MusicGen checkpoints", "4.88 / 5.14 / 5.48",
     "audiocraft MusicGen model card"),
    ("kl_passt", "MusicLM", "1.01", "arXiv 2301.11325, Table 1 (KLD, LEAF classifier: not PaSST)"),
    ("kl_passt", "MusicGen (300M-3.3B)", "1.22-1.28", "arXiv 2306.05284, Table 1 (KL, PaSST)"),
    ("kl_passt", "audiocraft's released MusicGen checkpoints", "1.42 / 1.38 / 1.37", "audiocraft MusicGen model card"),
    ("clap_score", "MusicGen (300M-3.3B)", "0.31-0.32", "arXiv 2306.05284, Table 1 (CLAP score)"),
    ("clap_score", "audiocraft's released MusicGen checkpoints", "0.27-0.28", "audiocraft MusicGen model card"),
    ("mulan_cycle_consistency", "MusicLM", "0.51", "arXiv 2301.11325, Table 1 (MCC, Google's MuLan: not ours)"),
)


def _top_labels(probs: np.ndarray, labels: Optional[Sequence[str]], k: int = 3) -> list[str]:
    order = np.argsort(-probs)[:k]
    return [labels[i] if labels is not None else str(i) for i in order]


def evaluate_generation(checkpoint_dir: str, output_dir: str, *, musiclm, eval_data: Optional[str] = None,
                        split: str = "test", max_examples: int = 1000, batch_size: int = 16,
                        duration_s: Optional[float] = None, seed: int = 0,
                        embedding_model: Union[str, embedders.AudioEmbedder] = "mulan",
                        embedding_checkpoint: Optional[str] = None, embedding_layer: Optional[int] = None,
                        classifier: Union[str, Callable] = "mulan_zero_shot",
                        classifier_checkpoint: Optional[str] = None,
                        class_labels: Sequence[str] = embedders.DEFAULT_LABELS,
                        classifier_temperature: float = 0.1, mcc_mulan_checkpoint: Optional[str] = None,
                        clap_checkpoint: Optional[str] = None, passt_checkpoint: Optional[str] = None,
                        token_dir: Optional[str] = None, memorization_examples: int = 256,
                        memorization_split: str = "train", prompt_seconds: float = 10.0,
                        continuation_seconds: float = 5.0, memorization_temperature: Optional[float] = None,
                        approximate_threshold: float = 0.1, report_samples: int = 8) -> dict:
    """Generates audio for the eval set's captions and returns the metrics of the module docstring; writes the
    clips, samples.jsonl and report.html to `output_dir`.

    Args:
      checkpoint_dir: the run directory eval.evaluate records (gin/eval/generation.gin passes the semantic
        stage's); the models are `musiclm`'s.
      musiclm: a pipeline.MusicLM with its generation settings, or a function that loads one (called after the
        settings and the eval data have been checked, so a bad setting fails before any model loads).
      duration_s: seconds per clip (None: musiclm's setting); references are cut or padded to it.
      seed: batch b of captions is generated with seed + b.
      embedding_model, embedding_checkpoint, embedding_layer: FAD's embedding model (module docstring).
      classifier, classifier_checkpoint, class_labels, classifier_temperature: KLD's classifier.
      mcc_mulan_checkpoint: the MuLan of the cycle consistency (None: the generating one).
      clap_checkpoint: a converted CLAP run directory for `clap_score` (None: skipped).
      passt_checkpoint: a converted PaSST run directory for `kl_passt` (None: skipped).
      token_dir, memorization_*, prompt_seconds, continuation_seconds, approximate_threshold: memorization.
      report_samples: how many samples the report shows with players and spectrograms.
    """
    del checkpoint_dir  # recorded by eval.evaluate
    embedders.check_embedding_model(embedding_model, embedding_checkpoint)
    embedders.check_classifier(classifier)
    eval_data_lib.parse_eval_data(eval_data)
    if token_dir is not None:
        token_cache.read_manifest(token_dir)
    if max_examples < 2 or batch_size < 1:
        raise ValueError(f"max_examples ({max_examples}) must be >= 2 and batch_size ({batch_size}) >= 1")
    if not hasattr(musiclm, "generate"):
        musiclm = musiclm()
    if duration_s is not None:
        musiclm.set_generation_params(duration_s=float(duration_s))
    duration_s = musiclm.params.duration_s
    rate = musiclm.sample_rate
    report = BadInputReport("skip", f"generation eval {eval_data or 'synthetic'}")
    examples = eval_data_lib.eval_examples(eval_data, rate, duration_s, max_examples, split, report)
    captions = [e.caption for e in examples]
    reference = np.stack([e.audio for e in examples])
    print(f"generation eval: {len(examples)} captions of {eval_data or 'synthetic'} split {split!r}, "
          f"{duration_s} s each", file=sys.stderr)

    # Generate, write, and read back: the metrics are those of the files.
    os.makedirs(output_dir, exist_ok=True)
    generated_audio = generate_all(musiclm, captions, batch_size, seed, log=musiclm.log)
    samples = []
    for i, (example, clip) in enumerate(zip(examples, generated_audio)):
        name = f"{i:04d}_{report_lib.slug(example.caption)}"
        wav = os.path.join("generated", name + ".wav")
        audio_io.save_audio(os.path.join(output_dir, wav), clip, rate)
        samples.append({"caption": example.caption, "reference_id": example.id, "wav": wav})
    generated = np.stack([audio_io.load_audio(os.path.join(output_dir, s["wav"]), rate) for s in samples])

    mulans = embedders.MuLanCache(musiclm.mulan)
    metrics: dict = {"num_examples": len(examples), "num_skipped": report.num_skipped, "duration_s": duration_s}
    embedder = embedders.make_embedder(embedding_model, embedding_checkpoint, embedding_layer, mulans)
    metrics[f"fad_{embedders.component_name(embedder)}"] = generation_metrics.frechet_audio_distance(
        embedders.embed_clips(embedder, reference, rate, batch_size),
        embedders.embed_clips(embedder, generated, rate, batch_size))
    clf = embedders.make_classifier(classifier, classifier_checkpoint, class_labels, classifier_temperature, mulans)
    ref_probs = embedders.class_probabilities(clf, reference, rate, batch_size)
    gen_probs = embedders.class_probabilities(clf, generated, rate, batch_size)
    metrics[f"kld_{embedders.component_name(clf)}"] = generation_metrics.kl_divergence(ref_probs, gen_probs)
    mcc_mulan = mulans.get(mcc_mulan_checkpoint)
    text, audio_embeddings = embedders.caption_and_clip_embeddings(mcc_mulan, captions, generated, rate, batch_size)
    metrics["mulan_cycle_consistency"] = generation_metrics.mulan_cycle_consistency(text, audio_embeddings)
    cosines = np.sum(text * audio_embeddings, axis=1)
    skipped = {}
    if passt_checkpoint is None:
        skipped["kl_passt"] = "no PASST_CHECKPOINT given (a PaSST converted by python -m musiclm_jax.convert passt)"
    else:
        from musiclm_jax.evaluation.passt_model import PaSSTClassifier
        metrics["kl_passt"] = embedders.passt_kl(PaSSTClassifier.from_checkpoint(passt_checkpoint), reference,
                                                 generated, rate, batch_size)
    if clap_checkpoint is None:
        skipped["clap_score"] = "no CLAP_CHECKPOINT given (a CLAP converted by python -m musiclm_jax.convert clap)"
    else:
        metrics["clap_score"] = embedders.clap_score(mulans.get(clap_checkpoint), captions, generated, rate, batch_size)
    if token_dir is None:
        skipped["memorization"] = "no TOKEN_DIR given (set --gin.TOKEN_DIR to the token cache of the training data)"
    if skipped:
        metrics["skipped_metrics"] = skipped
    if token_dir is not None:
        metrics.update(memorization_eval.memorization_from_cache(
            musiclm, token_dir, prompt_seconds, continuation_seconds, memorization_examples, memorization_split,
            memorization_temperature, approximate_threshold, seed, batch_size))

    # Per-sample details, the report's files and the report.
    labels = getattr(clf, "labels", None)
    for i, s in enumerate(samples):
        s.update(mulan_cosine=float(cosines[i]), generated_top_labels=_top_labels(gen_probs[i], labels),
                 reference_top_labels=_top_labels(ref_probs[i], labels))
        if i < report_samples:
            s["spectrogram"] = os.path.splitext(s["wav"])[0] + ".png"
            report_lib.spectrogram_png(generated[i], rate, os.path.join(output_dir, s["spectrogram"]))
            s["reference_wav"] = os.path.join("reference", os.path.basename(s["wav"]))
            audio_io.save_audio(os.path.join(output_dir, s["reference_wav"]), reference[i], rate)
            s["reference_spectrogram"] = os.path.splitext(s["reference_wav"])[0] + ".png"
            report_lib.spectrogram_png(reference[i], rate, os.path.join(output_dir, s["reference_spectrogram"]))
    with open(os.path.join(output_dir, "samples.jsonl"), "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    p = musiclm.params
    settings = {"eval_data": eval_data or "synthetic", "split": split, "num_examples": len(examples),
                "duration_s": duration_s, "seed": seed, "batch_size": batch_size, "temperature": p.temperature,
                "top_k": p.top_k, "top_p": p.top_p, "guidance_scale": p.guidance_scale,
                "embedding_model": embedders.component_name(embedder),
                "embedding_checkpoint": embedding_checkpoint or "generating MuLan",
                "classifier": embedders.component_name(clf), "class_labels": ", ".join(labels) if labels else "-",
                "classifier_temperature": classifier_temperature,
                "mcc_mulan_checkpoint": mcc_mulan_checkpoint or "generating MuLan",
                "clap_checkpoint": clap_checkpoint or "-", "passt_checkpoint": passt_checkpoint or "-",
                "token_dir": token_dir or "-"}
    musiccaps = eval_data_lib.parse_eval_data(eval_data)[0] == "musiccaps"
    report_lib.write_evaluation_report(output_dir, metrics, settings, samples,
                                       published=PUBLISHED_MUSICCAPS if musiccaps else ())
    print(f"generation eval: wrote {len(samples)} clips, samples.jsonl and report.html to {output_dir}",
          file=sys.stderr)
    return metrics
