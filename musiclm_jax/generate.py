"""`python -m musiclm_jax.generate`: captions -> wav files, samples.jsonl and an HTML report.

    python -m musiclm_jax.generate --gin_file=gin/sample/musiclm.gin --prompt "calm piano" [--prompt "..."] \
        --duration 10 --output_dir DIR [--seed S] [--guidance 3.0] [--continue_from a.wav] [--rerank N] \
        [--melody m.wav]

gin/sample/musiclm.gin names the run directories (MULAN_CHECKPOINT, CODEC_CHECKPOINT, SEMANTIC_CHECKPOINT,
COARSE_CHECKPOINT, FINE_CHECKPOINT, SEMANTIC_TOKENIZER) and the default sampling settings. Writes, in DIR:
  <index>_<slug>.wav      each prompt's audio at the codec's rate
  <index>_<slug>.png      its log-mel spectrogram
  samples.jsonl           one line per sample: prompt, wav, seed, settings, duration_s, seconds (wall time),
                          mulan_score (cosine between the prompt's and the audio's MuLan embeddings), and with
                          --rerank N the N candidates' scores (the kept one is the highest)
  report.html             the prompts, settings, spectrograms and audio players
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Optional, Sequence

from musiclm_jax import gin_utils
from musiclm_jax.generation.melody import describe as describe_melody

FLAGS = {"prompt": [], "duration": None, "output_dir": None, "seed": None, "guidance": None, "continue_from": None,
         "rerank": None, "melody": None}


def load_musiclm(mulan_checkpoint: str, codec_checkpoint: str, semantic_checkpoint: str, coarse_checkpoint: str,
                 fine_checkpoint: str, semantic_tokenizer: Optional[str] = None,
                 temperature: Sequence[float] = (1.0, 0.95, 0.4), top_k: int = 0, top_p: float = 1.0,
                 guidance_scale: float = 1.0, duration_s: float = 10.0, seed: int = 0,
                 decode_weights: str = "float32", decode_matvec: str = "xla"):
    """The pipeline.MusicLM of the given run directories with its default generation settings (bound in gin);
    decode_weights: 'float32', 'bfloat16' or 'int8' (weight-only), the stages' weights while sampling
    (musiclm_jax.weight_precision); decode_matvec: 'xla', or 'kernel' for the CPU matrix-vector kernel in the
    decoding steps (musiclm_jax.kernels.matvec; built on first use with the system C++ compiler)."""
    from musiclm_jax.generation.pipeline import MusicLM
    musiclm = MusicLM.from_checkpoints(mulan_checkpoint, codec_checkpoint, semantic_checkpoint, coarse_checkpoint,
                                       fine_checkpoint, semantic_tokenizer=semantic_tokenizer,
                                       decode_weights=decode_weights, decode_matvec=decode_matvec)
    musiclm.set_generation_params(temperature=tuple(temperature), top_k=top_k, top_p=top_p,
                                  guidance_scale=guidance_scale, duration_s=duration_s, seed=seed)
    return musiclm


def run(musiclm, prompts: Sequence[str], output_dir: str, continue_from: Optional[str] = None,
        rerank: int = 1, melody: Optional[str] = None) -> list[dict]:
    """Generates each prompt (one at a time, so every sample gets the run's seed) and writes the outputs;
    rerank > 1 keeps the best of that many candidates by MuLan score; melody: an audio file whose melody every
    sample follows (MusicLM.generate)."""

    from musiclm_jax.evaluation import report
    from musiclm_jax.data import audio_io
    if not prompts:
        raise ValueError("give at least one --prompt")
    os.makedirs(output_dir, exist_ok=True)
    prompt_audio = None if continue_from is None else audio_io.load_audio(continue_from, musiclm.codec.sample_rate)
    melody_audio = None if melody is None else audio_io.load_audio(melody, musiclm.codec.sample_rate)
    if melody_audio is not None and prompt_audio is not None:
        raise ValueError("--melody and --continue_from cannot be combined")
    samples = []
    for index, prompt in enumerate(prompts):
        start = time.time()
        if prompt_audio is None:
            result = musiclm.generate([prompt], rerank=rerank, melody=melody_audio, return_details=True)
        else:
            result = musiclm.generate_continuation(prompt_audio, [prompt], return_details=True)
        audio = result.audio[0]
        seconds = time.time() - start
        name = f"{index:02d}_{report.slug(prompt)}"
        audio_io.save_audio(os.path.join(output_dir, name + ".wav"), audio, musiclm.codec.sample_rate)
        report.spectrogram_png(audio, musiclm.codec.sample_rate, os.path.join(output_dir, name + ".png"))
        score = float(musiclm.mulan_scores([prompt], audio[None])[0])
        settings = {k: v for k, v in dataclasses.asdict(musiclm.params).items() if k != "duration_s"}
        if continue_from:
            settings["continue_from"] = continue_from
        if melody:
            settings["melody"] = melody
            settings["melody_tokens"] = describe_melody(result.tokens["melody"][0])
        if rerank > 1 and prompt_audio is None:
            settings["rerank"] = rerank
            settings["candidate_mulan_scores"] = [round(float(x), 6) for x in result.scores[0]]
        samples.append({"prompt": prompt, "wav": name + ".wav", "spectrogram": name + ".png",
                        "seed": musiclm.params.seed, "settings": settings, "duration_s": len(audio) /
                        musiclm.codec.sample_rate, "seconds": seconds, "mulan_score": score})
        print(f"generate: {prompt!r} -> {name}.wav ({samples[-1]['duration_s']:.2f} s of audio in {seconds:.1f} s, "
              f"MuLan score {score:.3f})", file=sys.stderr)
    with open(os.path.join(output_dir, "samples.jsonl"), "w") as f:
        for sample in samples:
            f.write(json.dumps(sample) + "\n")
    path = report.write_report(output_dir, samples)
    print(f"generate: wrote {len(samples)} samples and {path}", file=sys.stderr)
    return samples


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    import gin

    def go(flags):
        if not flags["output_dir"]:
            raise gin_utils.FlagError("--output_dir is required")
        musiclm = gin.get_configurable(load_musiclm)()
        overrides = {}
        if flags["duration"] is not None:
            overrides["duration_s"] = float(flags["duration"])
        if flags["seed"] is not None:
            overrides["seed"] = int(flags["seed"])
        if flags["guidance"] is not None:
            overrides["guidance_scale"] = float(flags["guidance"])
        musiclm.set_generation_params(**overrides)
        return run(musiclm, flags["prompt"], flags["output_dir"], flags["continue_from"],
                   rerank=int(flags["rerank"] or 1), melody=flags["melody"])
    return gin_utils.run(go, extra_flags=FLAGS, argv=argv)


if __name__ == "__main__":
    from musiclm_jax import generate as _generate_module  # gin binds musiclm_jax.generate, not __main__
    _generate_module.main()
