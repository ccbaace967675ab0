"""Text -> music: MuLan, the three stages and the codec chained into `generate(texts)` (as audiocraft's API).

    musiclm = MusicLM.from_checkpoints(mulan=..., codec=..., semantic=..., coarse=..., fine=...)
    musiclm.set_generation_params(duration_s=10.0, temperature=(1.0, 0.95, 0.4), guidance_scale=3.0, seed=0)
    audio = musiclm.generate(["calm piano", "loud rock drums"])     # [2, 10 s * codec rate] float32

Chain, per batch of captions:
  1. MuLan: captions -> conditioning tokens [B, 12] (its RVQ of the text embedding).
  2. Semantic stage: MuLan tokens -> duration * semantic_rate semantic tokens.
  3. Coarse stage: MuLan + semantic tokens of a window -> codec levels 1..Lc of the same window.
  4. Fine stage: coarse levels of a window -> levels Lc+1..Lc+Lf.
  5. Codec: all levels -> audio.

Every stage samples with the jitted KV-cached decoder (`sample_window`: what TokenLMModel.predict_batch_with_aux
does, from the model's prefill and step functions; one compiled program per window shape). A served stage
(musiclm_jax.serving) runs the same driver on those functions exported with jax.export. A stage whose window (its
training length) is shorter than the request runs over sliding windows: each window after the first keeps the last
half window of frames already generated as its prompt and generates the rest, so each window continues the music
(the paper's semantic recipe: 30 s windows, 15 s stride, 15 s prompt). Continuation puts a clip's own semantic
tokens and codes first; story mode changes the MuLan tokens at segment boundaries, which no window's new frames
cross. Classifier-free guidance (guidance_scale != 1) applies to the stages trained with conditioning dropout (their
`guidance_groups`: the MuLan tokens); its unconditional input drops the melody too (`unconditional_groups`), so a
given melody is followed more strongly as the scale rises, and without one both inputs have PAD there. Melody
(`generate(texts, melody=audio)`): a semantic stage trained with melody tokens in its prefix
(gin/stages/semantic_tiny.gin) gets, per window, the melody token (musiclm_jax.generation.melody, the dominant pitch class per
200 ms) of each of the window's frames, PAD where the melody has ended or none was given; a coarse stage trained
with them (gin/stages/coarse_melody_tiny.gin) gets the melody token of each semantic frame of its window the same
way, beside the semantic tokens. Reranking (`rerank=N`) samples N candidates per caption and keeps the one MuLan
scores closest to the caption. Randomness: stage s, window w draws from fold_in(key(seed), 1000 s + w), split per
example, so a seed gives the same audio.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Iterator, Optional, Sequence

import jax
import numpy as np

from musiclm_jax import interfaces
from musiclm_jax.generation.params import GenerationParams, GenerationResult, PromptError
from musiclm_jax.generation.stage_sampling import Stage, coarse_codec_frames_per_semantic_frame

STAGES = ("semantic", "coarse", "fine")


class MusicLM:
    """Generation from captions. Args: the frozen models (MuLan, codec), the three stages, the semantic tokenizer
    (continuation needs it), each anything that implements its protocol in musiclm_jax.interfaces (the inference
    classes, or a bundle's served parts), and melody_rate (Hz of the melody analysis, musiclm_jax.generation.melody; as
    the tokenization job's `melody_rate`, gin/tokenize/base.gin).

    The semantic rate (Hz) is not a setting: the coarse stage's window holds `semantic frames` semantic tokens
    for `codec frames` frames of codes (its layout, from the token cache), so semantic_rate = codec.frame_rate *
    semantic frames / codec frames (25 Hz for the tiny and paper stages). `semantic_rate`, where given (a served
    bundle's manifest), and the tokenizer's frame_rate must agree with it.
    """

    def __init__(self, mulan: interfaces.MuLan, codec: interfaces.Codec, semantic: interfaces.Stage,
                 coarse: interfaces.Stage, fine: interfaces.Stage,
                 semantic_tokenizer: Optional[interfaces.SemanticTokenizer] = None,
                 log=sys.stderr, melody_rate: float = 5.0, semantic_rate: Optional[float] = None):
        self.mulan, self.codec, self.semantic_tokenizer = mulan, codec, semantic_tokenizer
        self.stages = {"semantic": semantic, "coarse": coarse, "fine": fine}
        self.ratio = coarse_codec_frames_per_semantic_frame(coarse.model)
        self.semantic_rate = codec.frame_rate / self.ratio
        for what, given in (("semantic_rate", semantic_rate),
                            ("the semantic tokenizer's frame_rate",
                             None if semantic_tokenizer is None else semantic_tokenizer.frame_rate)):
            if given is not None and abs(float(given) - self.semantic_rate) > 1e-6:
                raise ValueError(f"{what} {given} Hz != {self.semantic_rate} Hz, the rate of the coarse stage's "
                                 f"semantic tokens (codec {codec.frame_rate} Hz / {self.ratio} codec frames per "
                                 f"semantic frame)")
        self.log = log
        self.params = GenerationParams()
        self.coarse_levels = coarse.model.layout.group("coarse").levels
        self.fine_levels = fine.model.layout.group("fine").levels
        if self.coarse_levels + self.fine_levels != codec.num_quantizers:
            raise ValueError(f"coarse ({self.coarse_levels}) + fine ({self.fine_levels}) levels do not make the "
                             f"codec's {codec.num_quantizers}")
        sem = semantic.model
        # Stages that take the melody: one melody token per semantic frame (tasks/tokenized.py), the analysis
        # frames repeated. melody_length: the semantic stage's melody tokens per window (0: it takes none).
        self.melody_stages = tuple(name for name in ("semantic", "coarse")
                                   if "melody" in self.stages[name].model.prefix_groups)
        self.melody_length = 0
        if "semantic" in self.melody_stages:
            self.melody_length = sem.prefix_length - sum(sem.layout.group(g).levels for g in sem.prefix_groups
                                                         if g != "melody")
            if self.melody_length != sem.target_length:
                raise ValueError(f"the semantic stage has {self.melody_length} melody tokens for its window of "
                                 f"{sem.target_length} frames: it takes one per semantic frame")
        if "coarse" in self.melody_stages:
            cm = coarse.model
            tokens = cm.prefix_length - cm.layout.group("mulan").levels
            if set(cm.prefix_groups) != {"mulan", "melody", "semantic"} or tokens % 2:
                raise ValueError(f"the coarse stage's prefix {cm.prefix_groups} of {cm.prefix_length} tokens is not "
                                 f"MuLan + one melody and one semantic token per semantic frame")
        if self.melody_stages:
            self.melody_rate = float(melody_rate)
            repeat = self.semantic_rate / self.melody_rate
            if abs(repeat - round(repeat)) > 1e-6:
                raise ValueError(f"the semantic rate {self.semantic_rate} Hz is not a whole multiple of melody_rate="
                                 f"{self.melody_rate} Hz")
            self.melody_repeat = int(round(repeat))

    @property
    def sample_rate(self) -> int:
        """Hz of the audio that generate() returns (the codec's rate)."""
        return int(self.codec.sample_rate)

    @classmethod
    def from_checkpoints(cls, mulan: str, codec: str, semantic: str, coarse: str, fine: str,
                         semantic_tokenizer: Optional[str] = None,
                         decode_weights: str = "float32", decode_matvec: str = "xla") -> "MusicLM":
        """Loads the run directories (MuLan with its RVQ, codec, the three stages, and optionally the semantic
        tokenizer, which continuation needs); decode_weights: the stages' weight precision for sampling
        ('float32', 'bfloat16' or 'int8' weight-only; Stage.from_checkpoint); decode_matvec: 'xla' or 'kernel'
        (the CPU matrix-vector kernel for the decoding steps, musiclm_jax.kernels.matvec)."""
        from musiclm_jax.codec.inference import Codec
        from musiclm_jax.mulan.inference import MuLan
        from musiclm_jax.semantic.inference import SemanticTokenizer
        stages = [Stage.from_checkpoint(path, name, decode_weights, decode_matvec)
                  for path, name in zip((semantic, coarse, fine), STAGES)]
        tokenizer = SemanticTokenizer.load(semantic_tokenizer) if semantic_tokenizer else None
        return cls(MuLan.from_checkpoint(mulan), Codec.from_checkpoint(codec), *stages,
                   semantic_tokenizer=tokenizer)

    def semantic_frames(self, params: GenerationParams) -> int:
        """Semantic frames generated for params.duration_s: enough to cover it (rounded up; the audio is then cut
        to duration_s * sample_rate samples), at least one."""
        return max(1, math.ceil(params.duration_s * self.semantic_rate - 1e-9))

    def generation_params(self, **kwargs) -> GenerationParams:
        """This object's default GenerationParams with fields replaced (duration_s, temperature as one value or
        one per stage, top_k, top_p, guidance_scale, seed): settings for one call (`params=`), leaving the
        defaults as they are."""
        unknown = set(kwargs) - {f.name for f in dataclasses.fields(GenerationParams)}
        if unknown:
            raise TypeError(f"unknown generation parameters {sorted(unknown)}")
        if "temperature" in kwargs:
            t = kwargs["temperature"]
            kwargs["temperature"] = tuple(float(x) for x in (t if isinstance(t, (tuple, list)) else (t, t, t)))
        params = dataclasses.replace(self.params, **kwargs)
        if params.duration_s <= 0:
            raise ValueError(f"duration_s={params.duration_s} must be positive")
        return params

    def set_generation_params(self, **kwargs) -> None:
        """Sets the default settings of later calls (audiocraft's API): fields as generation_params()."""
        self.params = self.generation_params(**kwargs)

    # ------------------------------------------------------------------------------------------- stages
    @staticmethod
    def _keys(params: GenerationParams, stage_index: int, window: int, batch: int) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(params.seed), 1000 * stage_index + window)
        return jax.random.split(key, batch)

    def _run_stage(self, name: str, total: int, window: int, levels: int, conditioning, known: Optional[np.ndarray],
                   batch: int, params: GenerationParams, boundaries: Sequence[int] = ()) -> np.ndarray:
        """Local codes [B, total, levels] of stage `name` over sliding windows of `window` frames (all of
        `_stage_windows`' windows, run now)."""
        out, windows = self._stage_windows(name, total, window, levels, conditioning, known, batch, params, boundaries)
        for _ in windows:
            pass
        return out

    def _stage_windows(self, name: str, total: int, window: int, levels: int, conditioning,
                       known: Optional[np.ndarray], batch: int, params: GenerationParams,
                       boundaries: Sequence[int] = ()) -> tuple[np.ndarray, Iterator[int]]:
        """(out: local codes [B, total, levels] of stage `name`, an iterator that samples one sliding window of
        `window` frames per step into `out` and yields the frames filled so far after it).

        Each window after the first keeps `window - window // 2` frames of context and generates the frames after
        them; the last one ends at `total` with at least half that context (so no window is left with a handful of
        frames); a window's new frames never cross a conditioning
        boundary (story mode). conditioning(begin, end, first_new) -> [B, P] global ids for the window's frames
        [begin, end) whose new frames start at first_new. `known` [B, k, levels]: given first frames. Window w
        draws from its own key (_keys), so running the windows later, interleaved with other stages', samples
        the same codes.
        """
        stage = self.stages[name]
        group = stage.model.target_group
        temperature = params.temperature[STAGES.index(name)]
        out = np.zeros((batch, total, levels), np.int32)
        filled = 0
        if known is not None:
            filled = min(known.shape[1], total)
            out[:, :filled] = known[:, :filled]
        context = window - max(1, window // 2)

        def windows(filled: int) -> Iterator[int]:
            start_time, w = time.time(), 0
            while filled < total:
                if filled == 0:
                    begin = 0
                elif total - filled <= window - context // 2:  # the last window: the rest, at least half the context
                    begin = max(0, total - window)
                else:
                    begin = filled - context
                end = min(begin + window, total, min([b for b in boundaries if b > filled], default=total))
                if end <= filled:  # a window cannot reach past the context: give it fewer context frames
                    begin, end = filled - (window - 1), filled + 1
                prompt = stage.model.layout.to_global(out[:, begin:filled].reshape(batch, -1), group)
                prefix = np.concatenate([conditioning(begin, end, filled), prompt], axis=1).astype(np.int32)
                new = stage.sample(prefix, (end - filled) * levels, (filled - begin) * levels,
                                   self._keys(params, STAGES.index(name), w, batch), params, temperature)
                out[:, filled:end] = stage.model.layout.to_local(new, group).reshape(batch, end - filled, levels)
                if self.log is not None:
                    print(f"generate: {name} stage window {w + 1}: frames {filled}-{end} of {total} after "
                          f"{filled - begin} of context ({time.time() - start_time:.1f} s)", file=self.log)
                filled, w = end, w + 1
                yield filled
        return out, windows(filled)

    def _require_melody_stage(self) -> None:
        if not self.melody_stages:
            raise ValueError("neither the semantic nor the coarse stage was trained with melody tokens (their prefix "
                             f"groups are {self.stages['semantic'].model.prefix_groups} and "
                             f"{self.stages['coarse'].model.prefix_groups}); train one with "
                             "gin/stages/semantic_tiny.gin, semantic_melody_paper.gin or coarse_melody_tiny.gin")

    def melody_tokens(self, melody_audio: np.ndarray, batch: int) -> np.ndarray:
        """Melody audio [B or 1, samples] (or [samples]) at the codec's rate -> melody tokens [batch, frames] at the
        melody rate of the stages that take one (musiclm_jax.generation.melody)."""
        from musiclm_jax.generation import melody
        self._require_melody_stage()
        audio = np.atleast_2d(np.asarray(melody_audio, np.float32))
        if audio.shape[0] not in (1, batch):
            raise ValueError(f"{audio.shape[0]} melodies for {batch} captions (give one, or one per caption)")
        tokens = melody.melody_tokens(audio, self.codec.sample_rate, self.melody_rate)
        if tokens.shape[1] == 0:
            raise ValueError(f"the melody ({audio.shape[1]} samples) is shorter than one melody frame "
                             f"({1 / self.melody_rate:.2f} s)")
        return np.repeat(tokens, batch, axis=0) if tokens.shape[0] == 1 else tokens

    def generate_tokens(self, texts: Sequence[str] = (), mulan_tokens: Optional[np.ndarray] = None,
                        semantic_prompt: Optional[np.ndarray] = None, codes_prompt: Optional[np.ndarray] = None,
                        segments: Optional[Sequence[int]] = None, melody_tokens: Optional[np.ndarray] = None,
                        params: Optional[GenerationParams] = None) -> dict[str, np.ndarray]:
        """{'mulan', 'semantic' [B, frames], 'codes' [B, codec frames, levels]} for the captions.

        mulan_tokens: [B, 12], or [B, S, 12] for S story segments whose semantic frames start at `segments`
          (S offsets, the first 0); default: the captions' tokens.
        semantic_prompt [B, k], codes_prompt [B, k * ratio, levels]: known first frames (continuation).
        melody_tokens [B, frames] at `melody_rate` (melody_tokens()): the melody the stages that take one follow.
        params: this call's settings (default: the object's, set_generation_params).
        """
        params = params or self.params
        outputs: dict[str, np.ndarray] = {}
        mulan_tokens, jobs = self._stage_jobs(texts, mulan_tokens, semantic_prompt, codes_prompt, segments,
                                              melody_tokens, params, outputs, need=lambda name, frames: None)
        for name in STAGES:  # each stage whole, in turn: the conditioning a window reads is there already
            outputs[name] = self._run_stage(name, **jobs[name])
        return {"mulan": mulan_tokens, "melody": melody_tokens, "semantic": outputs["semantic"][..., 0],
                "codes": np.concatenate([outputs["coarse"], outputs["fine"]], axis=-1)}

    def _stage_jobs(self, texts, mulan_tokens, semantic_prompt, codes_prompt, segments, melody_tokens,
                    params: GenerationParams, outputs: dict, need) -> tuple[np.ndarray, dict[str, dict]]:
        """(the MuLan tokens, {stage: the keyword arguments of its _run_stage / _stage_windows}) of
        generate_tokens' arguments. The coarse and fine stages' conditioning read outputs['semantic'] and
        outputs['coarse'] (local codes [B, frames, levels]) after need(stage, frames): that stage must have
        filled its first `frames` frames by then."""
        if mulan_tokens is None:
            mulan_tokens = self.mulan.tokens_from_text(list(texts))
        schedule = mulan_tokens if mulan_tokens.ndim == 3 else mulan_tokens[:, None]
        segments = list(segments) if segments is not None else [0]
        if len(segments) != schedule.shape[1] or segments[0] != 0 or sorted(segments) != segments:
            raise ValueError(f"segments {segments} must start at 0, increase and give one offset per MuLan segment "
                             f"({schedule.shape[1]})")
        batch = schedule.shape[0]
        semantic_frames = self.semantic_frames(params)
        codec_frames = semantic_frames * self.ratio
        sem, coarse, fine = (self.stages[s].model for s in STAGES)

        def mulan_ids(layout, semantic_frame):
            segment = max(i for i, first in enumerate(segments) if first <= semantic_frame)
            return layout.to_global(schedule[:, segment], "mulan")

        frame_melody = None  # the melody token of each semantic frame
        if melody_tokens is not None:
            self._require_melody_stage()
            frame_melody = np.repeat(melody_tokens, self.melody_repeat, axis=1)

        def semantic_conditioning(begin, end, first_new):  # MuLan (+ the melody of frames from `begin`, or PAD)
            ids = mulan_ids(sem.layout, first_new)
            if not self.melody_length:
                return ids
            tune = np.zeros((batch, self.melody_length), np.int32)  # PAD: no melody
            if frame_melody is not None:
                known = frame_melody[:, begin:begin + self.melody_length]
                tune[:, :known.shape[1]] = sem.layout.to_global(known, "melody")
            return np.concatenate([ids, tune], axis=1)
        coarse_melody = "coarse" in self.melody_stages
        coarse_window = ((coarse.prefix_length - coarse.layout.group("mulan").levels) // (1 + coarse_melody)
                         * self.ratio)

        def coarse_conditioning(begin, end, first_new):  # MuLan (+ melody) + the semantic tokens of [begin, end)
            first, last = begin // self.ratio, -(-end // self.ratio)
            need("semantic", last)
            parts = [mulan_ids(coarse.layout, first_new // self.ratio)]
            if coarse_melody:
                tune = np.zeros((batch, last - first), np.int32)  # PAD: no melody
                if frame_melody is not None:
                    known = frame_melody[:, first:last]
                    tune[:, :known.shape[1]] = coarse.layout.to_global(known, "melody")
                parts.append(tune)
            parts.append(coarse.layout.to_global(outputs["semantic"][:, first:last, 0], "semantic"))
            return np.concatenate(parts, axis=1)
        fine_window = fine.target_length // self.fine_levels

        def fine_conditioning(begin, end, first_new):
            need("coarse", end)
            return fine.layout.to_global(outputs["coarse"][:, begin:end].reshape(batch, -1), "coarse")
        common = {"batch": batch, "params": params}
        return mulan_tokens, {
            "semantic": dict(total=semantic_frames, window=sem.target_length, levels=1,
                             conditioning=semantic_conditioning,
                             known=None if semantic_prompt is None else semantic_prompt[..., None],
                             boundaries=segments[1:], **common),
            "coarse": dict(total=codec_frames, window=coarse_window, levels=self.coarse_levels,
                           conditioning=coarse_conditioning,
                           known=None if codes_prompt is None else codes_prompt[..., :self.coarse_levels],
                           boundaries=[b * self.ratio for b in segments[1:]], **common),
            "fine": dict(total=codec_frames, window=fine_window, levels=self.fine_levels,
                         conditioning=fine_conditioning,
                         known=None if codes_prompt is None else codes_prompt[..., self.coarse_levels:], **common)}

    def _codes_stream(self, texts: Sequence[str], params: GenerationParams, **token_args) -> Iterator[np.ndarray]:
        """generate_tokens(texts, params=params, **token_args)'s codes as the fine stage makes them: yields codes
        [B, f, levels] of the first f codec frames after each fine window (f grows to the last frame; the last
        array is generate_tokens' 'codes'). Each fine window runs the semantic and coarse windows it needs first,
        so the first codes come after one window of each stage instead of after the whole semantic stage."""
        outputs: dict[str, np.ndarray] = {}
        runs: dict[str, list] = {}

        def need(name, frames):
            run = runs[name]
            while run[0] < frames:
                run[0] = next(run[1])
        _, jobs = self._stage_jobs(texts, token_args.get("mulan_tokens"), token_args.get("semantic_prompt"),
                                   token_args.get("codes_prompt"), token_args.get("segments"),
                                   token_args.get("melody_tokens"), params, outputs, need)
        for name in STAGES:
            job = jobs[name]
            outputs[name], windows = self._stage_windows(name, **job)
            known = 0 if job["known"] is None else min(job["known"].shape[1], job["total"])
            runs[name] = [known, windows]
        for filled in runs["fine"][1]:
            yield np.concatenate([outputs["coarse"][:, :filled], outputs["fine"][:, :filled]], axis=-1)

    def _audio_stream(self, codes: Iterator[np.ndarray], params: GenerationParams) -> Iterator[np.ndarray]:
        """Codes as _codes_stream yields them -> consecutive audio chunks [B, n] float32 whose concatenation is
        decode_codes(the last codes): [B, duration_s * codec rate]. With a causal codec decoder (`codec.causal`: no
        sample depends on later frames) each codes prefix is decoded as it comes, padded with code 0 to the
        whole's frames so that it runs the very program of the final decode (a prefix decoded at its own shape
        differed from it by one 16-bit step in places on CPU), and its new samples yielded: the whole decode's,
        bit for bit (tests/test_serve.py). Otherwise the audio comes in one chunk at the end, from the one full
        decode. The cost: one full-length decode per fine window."""
        samples = int(round(params.duration_s * self.codec.sample_rate))
        frames = self.semantic_frames(params) * self.ratio
        causal = bool(getattr(self.codec, "causal", False))
        sent, whole = 0, None
        for prefix in codes:
            if prefix.shape[1] >= frames:
                whole = prefix
            elif causal:  # the prefix decoded at the whole's shape (code 0 after it): the same program
                padded = np.zeros(prefix.shape[:1] + (frames,) + prefix.shape[2:], np.int32)
                padded[:, :prefix.shape[1]] = prefix
                audio = self.codec.decode(padded)[:, :min(samples, prefix.shape[1] * self.codec.hop_length)]
                if audio.shape[1] > sent:
                    yield audio[:, sent:]
                    sent = audio.shape[1]
        audio = self.decode_codes(whole, params)
        if audio.shape[1] > sent or sent == 0:
            yield audio[:, sent:]

    def generate_stream(self, texts: Sequence[str], melody: Optional[np.ndarray] = None, *,
                        params: Optional[GenerationParams] = None) -> Iterator[np.ndarray]:
        """generate(texts, melody=melody, params=params)'s audio in consecutive chunks [len(texts), n] float32 (n
        varies; they concatenate to [len(texts), duration_s * codec rate], the same samples as generate's for the
        same seed and settings), one per fine-stage window as it completes when the codec is causal (else one at
        the end; _audio_stream). No reranking: it needs every candidate's whole audio."""
        if isinstance(texts, str):
            raise TypeError("generate_stream takes a list of captions")
        texts, params = list(texts), params or self.params
        tune = None if melody is None else self.melody_tokens(melody, len(texts))
        return self._audio_stream(self._codes_stream(texts, params, melody_tokens=tune), params)

    def decode_codes(self, codes: np.ndarray, params: GenerationParams) -> np.ndarray:
        """Codes [B, frames, levels] -> audio [B, duration_s * codec rate] (the frames cover the duration)."""
        return self.codec.decode(codes)[:, :int(round(params.duration_s * self.codec.sample_rate))]

    def _result(self, tokens: dict, params: GenerationParams, return_details: bool):
        audio = self.decode_codes(tokens["codes"], params)
        return GenerationResult(audio, tokens, params) if return_details else audio

    def _continuation_prompts(self, prompt_audio: np.ndarray, texts: Sequence[str],
                              params: GenerationParams) -> tuple[np.ndarray, np.ndarray]:
        """prompt_audio [B or 1, samples] (or [samples]) at the codec's rate -> (semantic tokens [B, k], codec codes
        [B, k * ratio, levels]) of its whole semantic frames k. PromptError if it is shorter than one frame or not
        shorter than duration_s; ValueError without a semantic tokenizer."""
        if self.semantic_tokenizer is None:
            raise ValueError("continuation needs the semantic tokenizer (MusicLM(..., semantic_tokenizer=...))")
        from musiclm_jax.data import audio_io
        audio = np.atleast_2d(np.asarray(prompt_audio, np.float32))
        if audio.shape[0] == 1 and len(texts) > 1:
            audio = np.repeat(audio, len(texts), axis=0)
        frames = int(audio.shape[1] / self.codec.sample_rate * self.semantic_rate)
        if frames < 1:
            raise PromptError(f"the prompt ({audio.shape[1]} samples) is shorter than one semantic frame")
        if frames >= self.semantic_frames(params):
            raise PromptError(f"the prompt ({audio.shape[1] / self.codec.sample_rate:.2f} s) is not shorter than "
                              f"duration_s={params.duration_s}")
        audio = audio[:, :int(round(frames / self.semantic_rate * self.codec.sample_rate))]
        resampled = audio_io.resample(audio, self.codec.sample_rate, self.semantic_tokenizer.sample_rate)
        semantic = np.asarray(self.semantic_tokenizer.tokenize(resampled))[:, :frames]
        codes = np.asarray(self.codec.encode(audio))[:, :frames * self.ratio]
        return semantic, codes

    def generate_continuation(self, prompt_audio: np.ndarray, texts: Sequence[str], *,
                              params: Optional[GenerationParams] = None, return_details: bool = False):
        """Continues prompt_audio [B, samples] (or [samples]) at the codec's rate under the captions: its semantic
        tokens (needs `semantic_tokenizer`) and codec codes are the first frames of every stage. Returns
        [B, duration_s * codec rate], the prompt's whole frames included (a GenerationResult with
        return_details). params: this call's settings (default: the object's)."""
        params = params or self.params
        semantic, codes = self._continuation_prompts(prompt_audio, texts, params)
        tokens = self.generate_tokens(texts, semantic_prompt=semantic, codes_prompt=codes, params=params)
        return self._result(tokens, params, return_details)

    def generate_continuation_stream(self, prompt_audio: np.ndarray, texts: Sequence[str], *,
                                     params: Optional[GenerationParams] = None) -> Iterator[np.ndarray]:
        """generate_continuation's audio in consecutive chunks [B, n] float32, as generate_stream (the prompt's
        own frames come in the first chunk, decoded with the first new window)."""
        params = params or self.params
        texts = list(texts)
        semantic, codes = self._continuation_prompts(prompt_audio, texts, params)
        return self._audio_stream(self._codes_stream(texts, params, semantic_prompt=semantic, codes_prompt=codes),
                                  params)

    def generate_story(self, story: Sequence[tuple[str, float]], *, params: Optional[GenerationParams] = None,
                       return_details: bool = False):
        """One continuous piece whose caption changes at each segment boundary: story [(caption, seconds), ...]
        -> audio [1, total seconds * codec rate] (a GenerationResult with return_details). Every window after a
        boundary is conditioned on the new caption and continues the music before it (its context). The call's
        duration is the story's; the settings are otherwise `params` (default: the object's), left unchanged."""
        if not story:
            raise ValueError("generate_story needs at least one (caption, seconds) segment")
        texts, seconds = zip(*story)
        if min(seconds) <= 0:
            raise ValueError(f"story segment lengths {seconds} must be positive")
        starts = np.cumsum([0.0] + list(seconds[:-1]))
        segments = [int(round(s * self.semantic_rate)) for s in starts]
        tokens = self.mulan.tokens_from_text(list(texts))[None]  # [1, S, 12]
        params = dataclasses.replace(params or self.params, duration_s=float(sum(seconds)))
        out = self.generate_tokens(mulan_tokens=tokens, segments=segments, params=params)
        return self._result(out, params, return_details)

    def mulan_scores(self, texts: Sequence[str], audio: np.ndarray) -> np.ndarray:
        """[B] cosine between each caption's MuLan text embedding and its clip audio [B, samples] (codec rate)."""
        from musiclm_jax.data import audio_io
        clips = audio_io.resample(audio, self.codec.sample_rate, self.mulan.sample_rate)
        return np.sum(self.mulan.embed_text(list(texts)) * self.mulan.embed_audio(clips), axis=-1)

    def generate(self, texts: Sequence[str], rerank: int = 1, melody: Optional[np.ndarray] = None, *,
                 params: Optional[GenerationParams] = None, return_details: bool = False):
        """Captions -> audio [len(texts), duration_s * codec.sample_rate] float32 at the codec's rate (with
        return_details, a GenerationResult holding it, the tokens and the reranking scores). params: this call's
        settings (default: the object's, set_generation_params).

        melody: audio [B or 1, samples] (or [samples]) at the codec's rate whose melody (the dominant pitch class
        per 200 ms, musiclm_jax.generation.melody) the stages that take one follow; past its end they run without one.

        rerank: N > 1 samples N candidates per caption (one batch of B * N, each with its own random stream) and
        keeps, per caption, the one whose MuLan audio embedding is closest to the caption's text embedding (the
        result's `scores` [B, N] are the cosines, `choice` [B] the kept candidates)."""
        if isinstance(texts, str):
            raise TypeError("generate takes a list of captions")
        if rerank < 1:
            raise ValueError(f"rerank={rerank} must be a positive number of candidates")
        texts = list(texts)
        params = params or self.params
        tune = None if melody is None else self.melody_tokens(melody, len(texts))
        if rerank == 1:
            return self._result(self.generate_tokens(texts, melody_tokens=tune, params=params), params, return_details)
        expanded = [t for t in texts for _ in range(rerank)]  # candidates of a caption are adjacent
        tokens = self.generate_tokens(expanded, melody_tokens=None if tune is None else np.repeat(tune, rerank, 0),
                                      params=params)
        audio = self.decode_codes(tokens["codes"], params)
        scores = self.mulan_scores(expanded, audio).reshape(len(texts), rerank)
        choice = np.argmax(scores, axis=1)
        keep = np.arange(len(texts)) * rerank + choice
        kept = {name: None if value is None else value[keep] for name, value in tokens.items()}
        result = GenerationResult(audio[keep], kept, params, scores, choice)
        return result if return_details else result.audio
