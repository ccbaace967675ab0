"""Generation speed on this CPU: seconds of audio generated per wall second, per stage and end to end.

    python benchmarks/generate.py [--size tiny] [--seconds 10] [--batch 1] [--guidance 3.0] [--repeats 3]
    python benchmarks/generate.py --size paper [--seconds 0.2] [--repeats 3] [--dtype float32]

Two sizes, both random-init (speed does not depend on the weights' values), both run through MusicLM's own chain
(musiclm_jax/generation/pipeline.py: generate_tokens, _run_stage over sliding windows, Stage.sample's jitted KV-cached
sampler, the codec's decode):
  tiny   every model tiny (gin/codec/tiny.gin; gin/mulan/tiny.gin with a 12 x 32 RVQ fitted on 40 synthetic clips
         and a 512-piece caption vocabulary; gin/stages/{semantic,coarse,fine}_tiny.gin), written as run
         directories under --model_root (default: a temporary directory, removed afterwards; runs already under
         an existing root are reused) and loaded with MusicLM.from_checkpoints. End to end is MusicLM.generate:
         captions -> MuLan tokens -> semantic -> coarse -> fine -> codec decode -> waveform.
  paper  the paper-size stages (gin/stages/{semantic,coarse,fine}_paper.gin: 24 layers, d=1024, ~430M parameters
         each, bf16 activations as configured; --dtype overrides) and the paper codec (gin/codec/paper.gin: 12 x
         1024 RVQ, 50 Hz), built in memory (no checkpoints; parameters on the host as Stage.from_checkpoint holds
         them), fed random MuLan tokens (12 x 1024): no MuLan (a random-init paper MuLan has no fitted RVQ, and
         its text tower is small next to the stages). End to end: MuLan tokens -> waveform.
         About 0.5 s per drawn token per stage on 2 cores, so the default is 0.2 s of audio (5 semantic tokens,
         40 coarse, 80 fine): about 70 s per call, about 6 minutes for the whole run; raise --seconds at will.
Building the tiny runs takes about 2 minutes (RVQ fit, vocabulary, checkpoints): keep them with --model_root.

Rows: mulan (text -> conditioning tokens, tiny only), semantic, coarse, fine (each stage's _run_stage, all its
windows), decode (codec decode and trim), end_to_end (the whole call). Units: wall seconds per call (median over
--repeats timed calls, with min and max); audio_s_per_wall_s = batch x seconds of audio / that row's median wall
seconds (above 1: faster than real time); tokens_per_s = tokens the stage draws (batch x frames x levels) / wall
seconds. Compilation is excluded: one warm-up call with the same shapes first (its wall time is reported as
warmup_s), then the timed calls (different seeds, same shapes, no recompilation). Classifier-free guidance
(--guidance, default the paper's 3.0) applies only to the stages whose config has guidance_groups (the first
printed line names them), where it doubles the sampled batch. A drawn token costs more the longer its context, so
short --seconds flatter the per-second figures a little; past a stage's window (its training length) the stage
runs over sliding windows, each re-reading half a window of context.

Machines are noisy (2 shared cores, other jobs, frequency scaling): read the medians, and rerun before trusting a
difference of a few percent. Prints a table, then one JSON line last with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time

import gin
import jax
import numpy as np

from musiclm_jax import aot, gin_utils, partitioning
from musiclm_jax.generation.pipeline import STAGES, MusicLM
from musiclm_jax.generation.stage_sampling import Stage

CAPTIONS = ("a calm piano melody with soft strings", "loud rock drums and distorted guitar",
            "an upbeat electronic dance track", "a slow jazz ballad on saxophone")
ROWS = ("mulan", "semantic", "coarse", "fine", "decode", "end_to_end")
DEFAULT_SECONDS = {"tiny": 10.0, "paper": 0.2}


class TimedMusicLM(MusicLM):
    """MusicLM that adds the wall seconds of each part of a generation call to `self.times` (every part returns
    numpy arrays, so each has finished when its time is taken)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.times: dict = {}

    def _timed(self, name, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
        return out

    def generate_tokens(self, texts=(), mulan_tokens=None, **kwargs):
        if mulan_tokens is None:
            mulan_tokens = self._timed("mulan", self.mulan.tokens_from_text, list(texts))
        return super().generate_tokens(texts, mulan_tokens=mulan_tokens, **kwargs)

    def _run_stage(self, name, *args, **kwargs):
        return self._timed(name, super()._run_stage, name, *args, **kwargs)

    def decode_codes(self, codes, params):
        return self._timed("decode", super().decode_codes, codes, params)


# ------------------------------------------------------------------------------------------------ models
def tiny_musiclm(root: str) -> TimedMusicLM:
    """Random-init tiny run directories under `root` (as tests/test_pipeline.py writes them; existing ones are
    reused), loaded as MusicLM.from_checkpoints loads them."""
    from musiclm_jax import run_directory
    from musiclm_jax.mulan import inference as mulan
    from musiclm_jax.mulan import text_vocab
    from musiclm_jax.fit_rvq import fit_rvq

    def missing(name, filename="config.gin"):
        return not os.path.exists(os.path.join(root, name, filename))
    if missing("codec"):
        run_directory.write_run_directory(os.path.join(root, "codec"), "gin/codec/tiny.gin", [], seed=1)
    if missing("mulan"):
        run_directory.write_run_directory(os.path.join(root, "mulan"), "gin/mulan/tiny.gin", [], seed=2)
    if missing("mulan", mulan.RVQ_FILE):
        fit_rvq(os.path.join(root, "mulan"), num_clips=40, levels=12, codebook_size=32, steps=2)
    # The tiny MuLan was never trained, so it has no caption vocabulary: give it one from the synthetic captions.
    text_vocab.ensure_vocabulary(os.path.join(root, "mulan"), "synthetic_music_16000hz", 512, max_captions=2000)
    for i, stage in enumerate(STAGES):
        if missing(stage):
            run_directory.write_run_directory(os.path.join(root, stage), f"gin/stages/{stage}_tiny.gin",
                                                   [f"TOKEN_DIR = '{aot.planned_token_dir('tiny')}'"], seed=3 + i)
    model = TimedMusicLM.from_checkpoints(*(os.path.join(root, n) for n in ("mulan", "codec") + STAGES))
    model.log = None
    return model


def gin_model(gin_file: str, bindings: list[str], size: str = "tiny"):
    tokens = aot.planned_token_dir(size)
    gin_utils.parse_gin([gin_file], ["MODEL_DIR = '/unused'", f"TOKEN_DIR = '{tokens}'"] + bindings, finalize=False)
    try:
        return gin_utils.bound_arguments("train", ["model"], {})["model"]
    finally:
        gin.clear_config()


def init_variables(model, seed: int):
    """The model's random-init variables (jitted: only the parameters are computed), on the host."""
    shapes = model.input_shapes(1)
    variables = jax.jit(lambda rng: partitioning.unbox(model.get_initial_variables(rng, shapes)))(
        jax.random.key(seed))
    return jax.device_get(variables)


def in_memory_musiclm(size: str, dtype) -> TimedMusicLM:
    """The stages (gin/stages/*_{size}.gin) and the codec (gin/codec/{size}.gin) of one size, random-init in
    memory, chained without MuLan (fed MuLan tokens)."""
    from musiclm_jax.codec.inference import Codec
    bindings = [f"transformer.TransformerConfig.dtype = '{dtype}'"] if dtype else []
    stages = []
    for i, name in enumerate(STAGES):
        model = gin_model(f"gin/stages/{name}_{size}.gin", bindings, size)
        stages.append(Stage(model, init_variables(model, 3 + i)["params"], name))
    model = gin_model(f"gin/codec/{size}.gin", [])
    variables = init_variables(model, 1)
    codec = Codec(model.generator, model.variables(variables["params"], variables), model.sample_rate)
    musiclm = TimedMusicLM(None, codec, *stages)
    musiclm.log = None
    return musiclm


# ------------------------------------------------------------------------------------------------ timing
def generate_once(musiclm: TimedMusicLM, texts, mulan_tokens, seed: int) -> tuple[dict, np.ndarray]:
    """Wall seconds of each part of one generation call (and end to end), and the audio."""
    musiclm.set_generation_params(seed=seed)
    musiclm.times = {}
    start = time.perf_counter()
    if mulan_tokens is None:
        audio = musiclm.generate(texts)
    else:
        audio = musiclm.decode_codes(musiclm.generate_tokens(mulan_tokens=mulan_tokens)["codes"], musiclm.params)
    return dict(musiclm.times, end_to_end=time.perf_counter() - start), audio


def summarise(runs: list[dict], audio_seconds: float, tokens: dict) -> dict:
    rows = {}
    for name in ROWS:
        if name not in runs[0]:
            continue
        times = [run[name] for run in runs]
        median = statistics.median(times)
        rows[name] = {"wall_s_median": median, "wall_s_min": min(times), "wall_s_max": max(times),
                      "wall_s_all": [round(t, 4) for t in times], "audio_s_per_wall_s": audio_seconds / median}
        if name in tokens:
            rows[name].update(tokens=tokens[name], tokens_per_s=tokens[name] / median)
    return rows


def print_table(rows: dict) -> None:
    print(f"{'part':<12}{'median s':>10}{'min s':>10}{'max s':>10}{'audio s/s':>11}{'tokens':>8}{'tokens/s':>10}")
    for name, row in rows.items():
        tokens = f"{row['tokens']:>8d}{row['tokens_per_s']:>10.1f}" if "tokens" in row else f"{'':>18}"
        print(f"{name:<12}{row['wall_s_median']:>10.3f}{row['wall_s_min']:>10.3f}{row['wall_s_max']:>10.3f}"
              f"{row['audio_s_per_wall_s']:>11.3f}{tokens}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "paper"), default="tiny")
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"seconds of audio per example (default {DEFAULT_SECONDS})")
    parser.add_argument("--batch", type=int, default=1, help="captions (examples) per call")
    parser.add_argument("--guidance", type=float, default=3.0,
                        help="classifier-free guidance scale (stages with guidance_groups only; 1: none)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model_root", default=None,
                        help="tiny: where the random-init run directories go (kept; reused when present)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                        help="paper: the stages' activation dtype (default: the gin files', bfloat16)")
    args = parser.parse_args()
    seconds = args.seconds if args.seconds is not None else DEFAULT_SECONDS[args.size]

    build_start = time.perf_counter()
    root = None
    if args.size == "tiny":
        root = args.model_root or tempfile.mkdtemp(prefix="generate_benchmark_")
        musiclm = tiny_musiclm(root)
        texts, mulan_tokens = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)], None
    else:
        musiclm = in_memory_musiclm("paper", args.dtype)
        group = musiclm.stages["semantic"].model.layout.group("mulan")
        texts = []
        mulan_tokens = np.random.RandomState(args.seed).randint(0, group.codebook_size, (args.batch, group.levels))
    build_s = time.perf_counter() - build_start
    musiclm.set_generation_params(duration_s=seconds, guidance_scale=args.guidance)

    try:
        start = time.perf_counter()
        _, audio = generate_once(musiclm, texts, mulan_tokens, args.seed)
        warmup_s = time.perf_counter() - start
        runs = []
        for i in range(args.repeats):
            times, audio = generate_once(musiclm, texts, mulan_tokens, args.seed + 1 + i)
            runs.append(times)
    finally:
        if root is not None and args.model_root is None:
            shutil.rmtree(root, ignore_errors=True)

    semantic_frames = max(1, int(round(seconds * musiclm.semantic_rate)))
    codec_frames = semantic_frames * musiclm.ratio
    tokens = {"semantic": args.batch * semantic_frames, "coarse": args.batch * codec_frames * musiclm.coarse_levels,
              "fine": args.batch * codec_frames * musiclm.fine_levels}
    audio_seconds = audio.shape[0] * audio.shape[1] / musiclm.codec.sample_rate
    rows = summarise(runs, audio_seconds, tokens)
    params = {name: int(sum(x.size for x in jax.tree.leaves(stage.params)))
              for name, stage in musiclm.stages.items()}
    guided = [name for name, stage in musiclm.stages.items() if stage.model.guidance_groups]
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    print(f"generate ({args.size}): {seconds:g} s x batch {args.batch} = {audio_seconds:g} s of audio per call; "
          f"guidance {args.guidance:g} on {', '.join(guided) or 'no stage'}; stage parameters "
          + ", ".join(f"{name} {n / 1e6:.1f}M" for name, n in params.items()))
    print(f"build {build_s:.1f} s, warm-up call (compiles) {warmup_s:.1f} s, then {args.repeats} timed calls on "
          f"{jax.devices()[0].platform} ({os.cpu_count()} cores); peak RSS {peak_rss_gib:.2f} GiB")
    print_table(rows)
    print(json.dumps({
        "benchmark": "generate",
        "size": args.size,
        "config": {"seconds": seconds, "batch": args.batch, "guidance_scale": args.guidance,
                   "guided_stages": guided, "temperature": list(musiclm.params.temperature),
                   "repeats": args.repeats, "stage_params": params, "semantic_frames": semantic_frames,
                   "codec_frames": codec_frames, "dtype": args.dtype or "config",
                   "mulan": "tiny" if args.size == "tiny" else "none (random MuLan tokens)"},
        "audio_s_per_call": audio_seconds,
        "end_to_end_audio_s_per_wall_s": rows["end_to_end"]["audio_s_per_wall_s"],
        "rows": rows,
        "build_s": build_s,
        "warmup_s": warmup_s,
        "peak_rss_gib": peak_rss_gib,
    }))


if __name__ == "__main__":
    main()
