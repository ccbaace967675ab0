"""`python -m musiclm_jax.demo`: text -> music end to end on the embedded synthetic music, on a CPU.

    python -m musiclm_jax.demo [--output_dir /tmp/musiclm_jax/demo] [--prompt "..."]... [--duration 4]
        [--redo STEP]... [--bind STEP:NAME=VALUE]... [--init_from STEP=DIR]...

The recipe (`python -m musiclm_jax.recipe`, the same orchestration, which runs it for `--embedded`) on the embedded
procedural music (data/synthetic_music.py), with its own prompts and measures: trains the tiny version of every
model, tokenizes the music, trains the three stages on the token cache, generates from the prompts and writes
the report. Each step is the project's own command line, run as a child process with its output shown as it
comes:

   1. codec           python -m musiclm_jax.train --gin_file=gin/codec/spectral_tiny.gin     -> DIR/codec
   2. w2v_bert        python -m musiclm_jax.train --gin_file=gin/w2v_bert/tiny_pitch.gin     -> DIR/w2v_bert
   3. semantic_tokens python -m musiclm_jax.fit_semantic --gin_file=gin/semantic/kmeans_tiny.gin
                                                                                          -> DIR/semantic_tokenizer
   4. mulan           python -m musiclm_jax.train --gin_file=gin/mulan/tiny.gin              -> DIR/mulan
   5. mulan_rvq       python -m musiclm_jax.fit_rvq (gin/mulan/rvq_tiny.gin: 12 x 32 tokens)  -> DIR/mulan/mulan_rvq.npz
   6. tokenize        python -m musiclm_jax.tokenize --gin_file=gin/tokenize/tiny.gin (2048 clips) -> DIR/tokens
   7-9. semantic_stage, coarse_stage, fine_stage
                      python -m musiclm_jax.train --gin_file=gin/stages/<stage>_tiny.gin     -> DIR/<stage>
                      (1000, 800 and 600 steps; the coarse stage's gin is coarse_melody_tiny.gin: it takes the
                      melody beside the semantic tokens)
  10. generate        python -m musiclm_jax.generate --gin_file=gin/sample/musiclm.gin       -> DIR/samples
  11. evaluate        MuLan similarity of each prompt to its own audio against shuffled pairs, how often the
                      pitch classes of audio generated with a melody agree with it, and how often the key
                      estimated from the generated audio is the key the prompt names; the codec's round
                      trips of pure tones and silence (codec_eval.codec_sanity)          -> DIR/quality.json

A finished step leaves DIR/.done/<step>; running the demo again skips those (and an interrupted training step
resumes from its last checkpoint), so delete DIR to start over, or pass --redo STEP to start one step over (its
output directory is removed first; later steps are not redone unless named too). The total time and each
step's time are printed at the end and written to DIR/timings.json.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

import numpy as np

from musiclm_jax import recipe

DEFAULT_PROMPTS = (
    "a fast-tempo piece in A major where a plucked string instrument plays a melody; a rock drum beat; dry mix",
    "a slow, quiet chord accompaniment on bowed strings in D minor, no drums at all, with hall reverb",
    "a medium-tempo synth lead melody in E major with an electronic drum-machine beat and a small room reverb",
    "a soft melody on a breathy blown wind instrument in 3/4 waltz time, no drums, large concert-hall reverb",
    "a loud, fast struck mallet instrument playing chords in G major with a shuffle drum groove",
    "a slow, soft plucked string melody in C minor with no drums at all and a dry, reverb-free sound",
    "an analog-style synthesizer playing a quiet chord accompaniment at 80 bpm, no drums, hall reverb",
    "a bowed string melody in F major at a fast tempo with a rock drum beat and a small room reverb",
    "loud, energetic struck marimba-like mallets playing a melody over chords in D major with electronic drums",
    "a quiet chord progression on plucked guitar-like strings in E minor at a slow tempo, no drums, hall reverb",
    "a blown woodwind melody with backing chords in Bb major at a medium tempo, a shuffle drum groove, dry mix",
    "a loud synth melody over chords in A minor at 140 bpm, a syncopated off-beat rhythm, rock drums, room reverb",
)
TOKENIZED_CLIPS = "{'train': 2048, 'validation': 64, 'test': 64}"  # 4 s each: enough for the stages not to overfit
STAGE_STEPS = recipe.STAGE_STEPS
# Guidance scale of the demo's generation (gin/sample/musiclm.gin's default is 3). Chosen on seeds 1 and 2, not the
# demo's seed 0: with the tiny models, scale 5 raised the MuLan margin of own over shuffled pairs from 0.093 to
# 0.128 and from 0.105 to 0.135 (12 prompts; scale 8 gave 0.096 on seed 1).
GUIDANCE = 5.0


def steps(out: str, prompts: Sequence[str], duration: float, seed: int) -> list[tuple[str, list[str]]]:
    """The demo's command steps: recipe.training_steps on the embedded music, then generation for `prompts`:
    (name, argv of `python -m ...`)."""
    sample = ["musiclm_jax.generate", "--gin_file=gin/sample/musiclm.gin", *recipe.checkpoints_gin(out),
              f"--output_dir={os.path.join(out, 'samples')}", f"--duration={duration}", f"--seed={seed}",
              f"--guidance={GUIDANCE}"] + [f"--prompt={p}" for p in prompts]
    tokenize = [f"--gin.tokenize.tokenize_dataset.max_clips={TOKENIZED_CLIPS}"]
    return recipe.training_steps(out, [], tokenize, STAGE_STEPS) + [("generate", sample)]


def permutation_p_value(similarity: np.ndarray, max_exact: int = 8, samples: int = 100_000, seed: int = 0) -> float:
    """One-sided permutation test of "prompts are closer to their own audio": similarity [prompts, audio] (square)
    -> the fraction of pairings pi (the identity included) whose mean similarity[i, pi(i)] is at least the matched
    mean. Every pairing for n <= max_exact (8! = 40,320), otherwise `samples` seeded random ones. The smallest
    value is 1/n! (1/40,320 for 8 prompts)."""
    import itertools
    sim = np.asarray(similarity, np.float64)
    n = sim.shape[0]
    if sim.shape != (n, n) or n < 2:
        raise ValueError(f"permutation_p_value needs a square matrix of at least 2 x 2, got {sim.shape}")
    if n <= max_exact:
        perms = np.array(list(itertools.permutations(range(n))))
    else:
        rng = np.random.RandomState(seed)
        perms = np.concatenate([np.arange(n)[None], np.array([rng.permutation(n) for _ in range(samples - 1)])])
    means = sim[np.arange(n)[None, :], perms].mean(axis=1)
    return float(np.mean(means >= np.trace(sim) / n - 1e-12))


def evaluate(out: str, seed: int = 0) -> dict:
    """MuLan similarity of each prompt to its generated audio (diagonal) against the shuffled pairs (every other
    prompt with that audio): {'matched_mean', 'shuffled_mean', 'matched_minus_shuffled', 'prompts_above_shuffled',
    'shuffled_permutation_mean' (a seeded derangement), 'permutation_p_value' (permutation_p_value), 'num_prompts',
    'similarity' [prompt][audio]}."""
    from musiclm_jax.data import audio_io
    from musiclm_jax.mulan.inference import MuLan
    samples_dir = os.path.join(out, "samples")
    with open(os.path.join(samples_dir, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    mulan = MuLan.from_checkpoint(os.path.join(out, "mulan"))
    audio = [audio_io.load_audio(os.path.join(samples_dir, s["wav"]), mulan.sample_rate) for s in samples]
    length = min(len(a) for a in audio)
    sim = np.asarray(mulan.similarity([s["prompt"] for s in samples], np.stack([a[:length] for a in audio])))
    n = len(samples)
    off = ~np.eye(n, dtype=bool)
    matched, shuffled = np.diag(sim), np.where(off, sim, np.nan)
    rng = np.random.RandomState(seed)
    perm = np.arange(n)
    while n > 1 and np.any(perm == np.arange(n)):
        perm = rng.permutation(n)
    result = {
        "num_prompts": n,
        "matched_mean": float(matched.mean()),
        "shuffled_mean": float(sim[off].mean()) if n > 1 else float("nan"),
        "shuffled_permutation_mean": float(sim[perm, np.arange(n)].mean()),
        "prompts_above_shuffled": int(np.sum(matched > np.nanmean(shuffled, axis=1))) if n > 1 else 0,
        "permutation_p_value": permutation_p_value(sim) if n > 1 else float("nan"),
        "similarity": sim.round(4).tolist(),
        "prompts": [s["prompt"] for s in samples],
    }
    result["matched_minus_shuffled"] = result["matched_mean"] - result["shuffled_mean"]
    return result


def key_accuracy(out: str, reference_clips: int = 24) -> dict:
    """The key of each generated clip whose prompt names one ('in A major'), estimated from its chroma
    (Krumhansl-Schmuckler, evaluation/pitch_metrics.estimate_key), against the named key: {'num_prompts' (with a
    key), 'key_accuracy' (tonic and mode), 'tonic_accuracy', 'chance' (1/24), 'named', 'estimated'} and, as the
    measure's own ceiling, 'estimator_accuracy_on_references': the same estimator on `reference_clips` synthetic
    test clips (4 s) against the keys they were rendered in."""
    from musiclm_jax.data import audio_io, synthetic_music
    from musiclm_jax.evaluation import pitch_metrics as pm
    samples_dir = os.path.join(out, "samples")
    with open(os.path.join(samples_dir, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    rate = 24000
    named, estimated = [], []
    for s in samples:
        key = pm.parse_key(s["prompt"])
        if key is None:
            continue
        named.append(key)
        estimated.append(pm.estimate_key(audio_io.load_audio(os.path.join(samples_dir, s["wav"]), rate), rate))
    indices = [i for i in range(10 * reference_clips) if synthetic_music.split_of(i) == "test"][:reference_clips]
    hits = 0
    for i in indices:
        clip = synthetic_music.generate_clip(i, seconds=4.0, sample_rate=rate)
        hits += pm.estimate_key(clip["audio"], rate) == (clip["params"].key, clip["params"].mode)
    n = len(named)
    return {"num_prompts": n,
            "key_accuracy": float(np.mean([a == b for a, b in zip(named, estimated)])) if n else float("nan"),
            "tonic_accuracy": float(np.mean([a[0] == b[0] for a, b in zip(named, estimated)])) if n else float("nan"),
            "chance": 1 / 24, "named": [pm.key_name(*k) for k in named],
            "estimated": [pm.key_name(*k) for k in estimated],
            "estimator_accuracy_on_references": hits / max(len(indices), 1)}


def clip_standard_error(generated: np.ndarray, reference: np.ndarray, pitched: np.ndarray) -> float:
    """Standard error of the mean of per-clip agreements: generated, reference [clips, frames] melody tokens,
    pitched [clips, frames] bool (the frames scored). Clips without a pitched frame are left out; nan for fewer
    than two clips."""
    per_clip = [np.mean(g[p] == r[p]) for g, r, p in zip(generated, reference, pitched) if p.any()]
    if len(per_clip) < 2:
        return float("nan")
    return float(np.std(per_clip, ddof=1) / np.sqrt(len(per_clip)))


def melody_following(out: str, duration: float, seed: int = 0, num_clips: int = 16) -> dict:
    """How closely generation follows a given melody: the melody tokens (musiclm_jax.generation.melody) of held-out
    synthetic test clips condition generation under their own captions; the generated audio's melody tokens are
    compared, on the frames where the melody has a pitch, with that melody ('agreement_with_melody'), and with
    the same captions generated without a melody ('agreement_without_melody') and with another clip's melody
    ('agreement_with_other_melody', a derangement) as the baselines; each 'agreement_*' has its standard error
    across clips beside it ('agreement_*_clip_se': frames of one clip are not independent, so the binomial error
    of the pooled frames understates it; with 4 clips the same models measured 27.5% where 12 clips gave 13%).
    The independent measure beside them:
    'chroma_cqt_agreement_*', librosa's chroma_cqt argmax of the generated audio against that of the melody's
    audio on the melody's clear frames (evaluation/pitch_metrics.py), which shares none of the melody tokens'
    analysis.

    Where the semantic tokenizer keeps pitch classes (SemanticTokenizer.token_pitch_classes), the same three are
    measured one step earlier, on the generated semantic tokens ('semantic_agreement_*': the pitch class most of a
    melody frame's semantic tokens stand for), next to the reference audio's own semantic tokens
    ('semantic_agreement_of_reference_tokens', what the tokens can carry): they tell the semantic stage's share
    from the acoustic stages' and the codec's."""
    from musiclm_jax.generation import melody
    from musiclm_jax.data import audio_io, synthetic_music
    from musiclm_jax.evaluation import pitch_metrics
    from musiclm_jax.generation.pipeline import MusicLM
    from musiclm_jax.semantic.inference import SemanticTokenizer
    musiclm = MusicLM.from_checkpoints(*(os.path.join(out, n) for n in ("mulan", "codec", "semantic", "coarse",
                                                                         "fine")))
    musiclm.log = None
    musiclm.set_generation_params(duration_s=duration, seed=seed, guidance_scale=GUIDANCE)
    rate = musiclm.codec.sample_rate
    indices = [i for i in range(1000) if synthetic_music.split_of(i) == "test"][:num_clips]
    clips = [synthetic_music.generate_clip(i, seconds=duration, sample_rate=rate) for i in indices]
    captions, tunes = [c["caption"] for c in clips], np.stack([c["audio"] for c in clips])
    reference = melody.melody_tokens(tunes, rate, musiclm.melody_rate)
    other = np.roll(np.arange(num_clips), 1)
    results = {"with_melody": musiclm.generate(captions, melody=tunes, return_details=True),
               "with_other_melody": musiclm.generate(captions, melody=tunes[other], return_details=True),
               "without_melody": musiclm.generate(captions, return_details=True)}
    pitched = reference != melody.NO_MELODY

    def agreement(tokens):
        return float(np.mean(tokens[pitched] == reference[pitched]))

    report = {"num_clips": num_clips, "pitched_frames": int(pitched.sum()), "chance": 1 / 12}
    generated = {name: melody.melody_tokens(result.audio, rate, musiclm.melody_rate)
                 for name, result in results.items()}
    for name, tokens in generated.items():
        report[f"agreement_{name}"] = agreement(tokens)
        report[f"agreement_{name}_clip_se"] = clip_standard_error(tokens, reference, pitched)
    for name, result in results.items():
        agree, clear = pitch_metrics.chroma_cqt_agreement(tunes, result.audio[:, :tunes.shape[1]], rate)
        report[f"chroma_cqt_agreement_{name}"] = agree / max(clear, 1)
    report["chroma_cqt_frames"] = clear
    tokenizer = SemanticTokenizer.load(os.path.join(out, "semantic_tokenizer"))
    classes = tokenizer.token_pitch_classes()
    if classes is not None:
        frames, per_frame = reference.shape[1], musiclm.melody_repeat  # semantic frames per melody frame

        def semantic_classes(semantic):  # [B, semantic frames] -> the majority pitch class of each melody frame
            votes = classes[np.asarray(semantic)[:, :frames * per_frame]].reshape(len(semantic), frames, per_frame)
            return np.apply_along_axis(lambda v: np.bincount(v, minlength=12).argmax(), 2, votes)
        for name, result in results.items():
            report[f"semantic_agreement_{name}"] = agreement(semantic_classes(result.tokens["semantic"]))
        own = tokenizer.tokenize(audio_io.resample(tunes, rate, tokenizer.sample_rate))
        report["semantic_agreement_of_reference_tokens"] = agreement(semantic_classes(own))
    report["reference"] = [melody.describe(r) for r in reference]
    report["generated"] = [melody.describe(g) for g in generated["with_melody"]]
    return report


def codec_checks(out_dir: str) -> dict:
    """The demo codec's round trips of pure tones (55 Hz to 4 kHz) and silence: codec_eval.codec_sanity of
    DIR/codec."""
    from musiclm_jax.codec.inference import Codec
    from musiclm_jax.evaluation import codec_eval
    return codec_eval.codec_sanity(Codec.from_checkpoint(os.path.join(out_dir, "codec")))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--output_dir", default="/tmp/musiclm_jax/demo")
    parser.add_argument("--prompt", action="append", default=None, help="a caption to generate (repeatable)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of audio per prompt")
    parser.add_argument("--seed", type=int, default=0)
    recipe.add_step_arguments(parser)
    args = parser.parse_args(argv)
    out = os.path.abspath(args.output_dir)
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    def evaluate_step(out_dir: str) -> None:
        quality = evaluate(out_dir, args.seed)
        quality["melody"] = melody_following(out_dir, args.duration, args.seed)
        quality["key"] = key_accuracy(out_dir)
        quality["codec_sanity"] = codec_checks(out_dir)
        with open(os.path.join(out_dir, "quality.json"), "w") as f:
            json.dump(quality, f, indent=1)

    plan = recipe.bind_plan(steps(out, prompts, args.duration, args.seed), args)
    timings = recipe.run_plan(plan + [("evaluate", evaluate_step)], out, args.redo, "demo", args.in_process,
                              recipe.local_launch(args, "demo"))
    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump(timings, f, indent=1)
    with open(os.path.join(out, "quality.json")) as f:
        quality = json.load(f)
    print(f"demo: MuLan similarity of each prompt to its own audio {quality['matched_mean']:.3f}, to the other "
          f"prompts' audio {quality['shuffled_mean']:.3f} ({quality['prompts_above_shuffled']} of "
          f"{quality['num_prompts']} prompts closer to their own audio; permutation test p = "
          f"{quality.get('permutation_p_value', float('nan')):.4f})")
    if "melody" in quality:
        m = quality["melody"]
        se = f" ± {m['agreement_with_melody_clip_se']:.0%}" if "agreement_with_melody_clip_se" in m else ""
        print(f"demo: generated pitch classes agree with a given melody on {m['agreement_with_melody']:.0%}{se} of "
              f"its {m.get('pitched_frames', '')} pitched frames (without a melody {m['agreement_without_melody']:.0%}, with another clip's melody "
              f"{m['agreement_with_other_melody']:.0%}, chance {m['chance']:.0%})")
        if "chroma_cqt_agreement_with_melody" in m:
            print(f"demo: by librosa chroma_cqt, {m['chroma_cqt_agreement_with_melody']:.0%} of the melody's clear "
                  f"frames (without a melody {m['chroma_cqt_agreement_without_melody']:.0%}, with another clip's "
                  f"{m['chroma_cqt_agreement_with_other_melody']:.0%})")
        if "semantic_agreement_with_melody" in m:
            print(f"demo: the generated semantic tokens' pitch classes agree with it on "
                  f"{m['semantic_agreement_with_melody']:.0%} (without a melody "
                  f"{m['semantic_agreement_without_melody']:.0%}, with another clip's "
                  f"{m['semantic_agreement_with_other_melody']:.0%}; the reference audio's own tokens "
                  f"{m['semantic_agreement_of_reference_tokens']:.0%})")
    if "key" in quality:
        k = quality["key"]
        print(f"demo: the key estimated from the generated audio is the prompt's key for {k['key_accuracy']:.0%} of "
              f"the {k['num_prompts']} prompts that name one (chance {k['chance']:.0%}; the estimator finds the key "
              f"of {k['estimator_accuracy_on_references']:.0%} of reference clips)")
    if "codec_sanity" in quality:
        c = quality["codec_sanity"]
        print(f"demo: the codec returns pure tones of {c['tones_hz'][0]:.0f} Hz to {c['tones_hz'][-1]:.0f} Hz within "
              f"{c['max_abs_cents']:.0f} cents, silence at {c['silence_dbfs']:.1f} dBFS, DC offset at most "
              f"{c['dc_offset']:.1e}")
    print(f"demo: report {os.path.join(out, 'samples', 'report.html')}")
    print(f"demo: finished in {timings['total'] / 60:.1f} min (steps run now: "
          f"{', '.join(f'{k} {v:.0f} s' for k, v in timings.items() if k != 'total') or 'none'})")
    return {"timings": timings, "quality": quality}


if __name__ == "__main__":
    main()
