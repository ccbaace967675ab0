"""One stage of generation: a TokenLMModel and its parameters sampled window by window.

StageSpec is what generation reads of a stage's model (layout and sequence shape; a served stage has only this);
sample_window samples one window through the KV-cached decoder (decoding.sample_after_prefix) from the model's
prefill and step functions, jitted once per window shape by Stage.sample; coarse_codec_frames_per_semantic_frame
reads the codec-to-semantic frame ratio off a coarse stage's window. pipeline.MusicLM chains three Stages; a
served stage (serving) runs the same sample_window on exported functions.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import jax
import numpy as np

from musiclm_jax.generation import decoding
from musiclm_jax.generation.params import GenerationParams
from musiclm_jax.generation.token_layout import TokenLayout


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """What generation reads of a stage's model: its token layout and sequence shape. TokenLMModel has these
    attributes; a stage served from an export bundle (musiclm_jax.serving) has only this."""

    layout: TokenLayout
    prefix_groups: tuple[str, ...]
    target_group: str
    prefix_length: int
    target_length: int
    guidance_groups: tuple[str, ...] = ()

    @classmethod
    def of(cls, model) -> "StageSpec":
        """The spec of a TokenLMModel (a served stage's model is already its spec)."""
        if isinstance(model, StageSpec):
            return model
        return cls(model.layout, tuple(model.prefix_groups), model.target_group, int(model.prefix_length),
                   int(model.target_length), tuple(model.unconditional_groups))

    def to_json(self) -> dict:
        return {"layout": [[g.name, g.levels, g.codebook_size] for g in self.layout.groups],
                "prefix_groups": list(self.prefix_groups), "target_group": self.target_group,
                "prefix_length": self.prefix_length, "target_length": self.target_length,
                "guidance_groups": list(self.guidance_groups)}

    @classmethod
    def from_json(cls, d: dict) -> "StageSpec":
        return cls(TokenLayout.from_tuples(d["layout"]), tuple(d["prefix_groups"]), d["target_group"],
                   int(d["prefix_length"]), int(d["target_length"]), tuple(d["guidance_groups"]))


def sample_window(prefill, step, params, prefix: jax.Array, keys: jax.Array, settings: dict, *, spec: StageSpec,
                  steps: int, prompt_length: int, guided: bool) -> jax.Array:
    """Samples one window of a stage: prefix [B, P] global ids (conditioning, then `prompt_length` known targets),
    keys [B] -> [B, steps] global ids, through decoding.sample_after_prefix (what
    TokenLMModel.predict_batch_with_aux runs too). prefill and step are the model's (`decoder_functions`); a
    served stage (musiclm_jax.serving) gives the same functions exported with jax.export, so both run this one
    driver. settings: {'temperature', 'top_k', 'top_p', 'guidance_scale'} scalars, traced under jit (one program
    serves all their values); guided (static): whether classifier-free guidance runs (the batch twice)."""
    tokens, _ = decoding.sample_after_prefix(
        prefill, step, params, prefix, keys, num_steps=steps, level_ranges=spec.layout.level_ranges(spec.target_group),
        prompt_length=prompt_length, guidance_ranges=tuple(spec.layout.id_range(g) for g in spec.guidance_groups),
        guidance_scale=settings["guidance_scale"], temperature=settings["temperature"], top_k=settings["top_k"],
        top_p=settings["top_p"], guided=guided)
    return tokens


class Stage:
    """A trained stage: its TokenLMModel and parameters, and one jitted sampler per window shape.

    A window is sampled by `sample_window` from the model's prefill and step functions (`decoder_functions`),
    the functions `python -m musiclm_jax.export` exports; a served stage swaps in the exported ones. With a
    `partitioner` (what from_checkpoint gives: this process's devices on the data axes), a batch of at least as
    many rows as the data axes hold is laid over them (rows padded to a multiple, parameters replicated), so
    evaluation's batches of captions run on every device; smaller batches run on one device, as without one."""

    def __init__(self, model, params, name: str, partitioner=None):
        self.model, self.params, self.name = model, params, name
        self.partitioner = partitioner
        self._samplers: dict = {}
        self._replicated = None  # the parameters on every device, made on the first sharded call

    @classmethod
    def from_checkpoint(cls, model_dir: str, name: str, decode_weights: str = "float32",
                        decode_matvec: str = "xla") -> "Stage":
        """The stage of a run directory; decode_weights: the precision its kernels and embedding tables are held
        in for sampling ('float32', 'bfloat16', 'int8'; musiclm_jax.weight_precision); decode_matvec: 'xla', or
        'kernel' for the CPU matrix-vector kernel in the decoding steps (musiclm_jax.kernels.matvec)."""
        from musiclm_jax import checkpoint_loading, partitioning, weight_precision
        from musiclm_jax.models import TokenLMModel
        if decode_weights not in weight_precision.PRECISIONS:  # before reading the checkpoint
            raise ValueError(f"decode_weights {decode_weights!r}: expected one of {weight_precision.PRECISIONS}")
        if decode_matvec not in weight_precision.MATVECS:
            raise ValueError(f"decode_matvec {decode_matvec!r}: expected one of {weight_precision.MATVECS}")
        loaded = checkpoint_loading.load_model(model_dir)
        if not isinstance(loaded.model, TokenLMModel):
            raise ValueError(f"{model_dir} holds a {type(loaded.model).__name__}, not a stage (TokenLMModel)")
        partitioner = None
        if jax.process_count() == 1 and jax.local_device_count() > 1:
            partitioner = partitioning.Partitioner(partitioning.create_mesh(partitioning.MeshConfig()))
        params = weight_precision.for_decoding(jax.device_get(loaded.params), decode_weights, decode_matvec)
        return cls(loaded.model, params, name, partitioner)

    def decoder_functions(self):
        """(prefill, step) of the KV-cached decoder, as sample_window takes them (TokenLMModel.decoder_functions)."""
        return self.model.decoder_functions()

    def sample(self, prefix: np.ndarray, steps: int, prompt_length: int, keys: jax.Array, params: GenerationParams,
               temperature: float) -> np.ndarray:
        """prefix [B, P] global ids (conditioning, then `prompt_length` known targets) -> [B, steps] global ids."""
        guidance = params.guidance_scale if self.model.guidance_groups else 1.0
        prefix = np.asarray(prefix)
        batch = prefix.shape[0]
        shard = self.partitioner is not None and batch >= self.partitioner.data_parallel_size > 1
        weights = self.params
        if shard:
            if self._replicated is None:
                self._replicated = jax.device_put(self.params, self.partitioner.replicated())
            weights = self._replicated
            prefix, _ = self.partitioner.pad_and_shard(prefix)
            key_data, _ = self.partitioner.pad_and_shard(np.asarray(jax.random.key_data(keys)))
            keys = jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(keys))
        guided = guidance != 1.0
        signature = (prefix.shape, steps, prompt_length, guided)  # the sampling settings are traced arguments
        if signature not in self._samplers:
            prefill, step = self.decoder_functions()
            self._samplers[signature] = jax.jit(partial(
                sample_window, prefill, step, spec=StageSpec.of(self.model), steps=steps,
                prompt_length=prompt_length, guided=guided))
        settings = {"temperature": np.float32(temperature), "top_k": np.int32(params.top_k),
                    "top_p": np.float32(params.top_p), "guidance_scale": np.float32(guidance)}
        return np.asarray(self._samplers[signature](weights, prefix, keys, settings))[:batch]


def coarse_codec_frames_per_semantic_frame(coarse) -> int:
    """Codec frames per semantic frame of a coarse stage's model (models.TokenLMModel): its target window holds
    target_length / levels codec frames, its prefix one semantic token per semantic frame (and, where it takes
    the melody, one melody token beside each) after the other conditioning groups (MuLan)."""
    codec_frames, rest = divmod(coarse.target_length, coarse.layout.group(coarse.target_group).levels)
    per_frame = 2 if "melody" in coarse.prefix_groups else 1
    other = sum(coarse.layout.group(g).levels for g in coarse.prefix_groups if g not in ("semantic", "melody"))
    semantic_frames, rest2 = divmod(coarse.prefix_length - other, per_frame)
    if rest or rest2 or semantic_frames < 1 or codec_frames % semantic_frames:
        raise ValueError(f"the coarse stage's window ({coarse.prefix_length} prefix tokens of {coarse.prefix_groups}, "
                         f"{coarse.target_length} target tokens) is not a whole number of codec frames per semantic "
                         f"frame")
    return codec_frames // semantic_frames
