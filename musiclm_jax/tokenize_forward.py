"""The tokenization job's device work as one pure function: chunks of audio -> codec, semantic and MuLan tokens.

`python -m musiclm_jax.tokenize` runs each frozen tokenizer through its own inference object (Codec,
SemanticTokenizer, MuLan). This module writes the same computation as one function of (variables, audio), so that
it can be compiled ahead of time for a pod (`python -m musiclm_jax.aot --job=tokenize`), counted in FLOPs
(musiclm_jax.flops) and benchmarked (benchmarks/tokenize_throughput.py) without checkpoints.
tests/test_tokenize.py holds it equal to the job's tokens.

    forward = TokenizationForward(codec_network, codec_rate, features, mulan_model, mulan_stride_samples)
    tokens = forward(variables, {24000: audio_24k, 16000: audio_16k})

Inputs: one array per sample rate the tokenizers read, [batch, chunk samples at that rate] (the job resamples
each chunk on the host, audio_io.resample). Outputs: {'codec': [batch, frames, levels] int32, 'semantic': [batch,
frames] int32, 'mulan': [batch, levels] int32, 'mulan_margins': [batch, levels] float32}, the last three only
with those tokenizers. The melody tokens are host work (numpy chroma) and are not part of it.

Variables: {'codec': the codec network's Flax variables, 'semantic': {'params', 'mean', 'std', 'centroids'},
'mulan': {'params' (the audio tower and projection suffice), 'codebooks' [levels, codes, dim]}}.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.mulan import inference as mulan_lib
from musiclm_jax import partitioning
from musiclm_jax.semantic import inference as semantic_lib
from musiclm_jax import vq


@dataclasses.dataclass(frozen=True)
class TokenizationForward:
    """See the module docstring.

    Attributes:
      codec_network: the codec's generator (SoundStream or SpectralCodec); codec_rate: its sample rate in Hz.
      features: the semantic tokenizer's semantic.FeatureExtractor (its params are not used), or None.
      mulan_model: mulan_model.MuLanModel, or None; mulan_stride_samples: hop of MuLan's clip windows (samples
        at MuLan's rate; MuLan.stride; unused without MuLan).
    """

    codec_network: Any
    codec_rate: int
    features: Optional[semantic_lib.FeatureExtractor] = None
    mulan_model: Any = None
    mulan_stride_samples: int = 1

    @property
    def sample_rates(self) -> list[int]:
        """The input rates, in Hz, ascending."""
        rates = {self.codec_rate}
        if self.features is not None:
            rates.add(self.features.sample_rate)
        if self.mulan_model is not None:
            rates.add(self.mulan_model.sample_rate)
        return sorted(rates)

    def input_shapes(self, batch: int, chunk_seconds: float) -> dict[int, tuple[int, int]]:
        """{rate: (batch, samples)} of a batch of chunks of chunk_seconds."""
        return {rate: (batch, int(round(chunk_seconds * rate))) for rate in self.sample_rates}

    def _mulan_embeddings(self, params, audio: jax.Array) -> jax.Array:
        """audio [batch, samples] -> unit-norm clip embeddings [batch, dim], as mulan.embed_clips: the mean over
        the windows every stride (and one ending at the clip's end) of their embeddings."""
        model = self.mulan_model
        window = model.segment_samples
        if audio.shape[1] < window:
            raise ValueError(f"TokenizationForward: chunks of {audio.shape[1]} samples are shorter than MuLan's "
                             f"{window}-sample window; the job pads such clips on the host (mulan.pad_to_window)")
        starts = np.asarray(mulan_lib.window_starts(audio.shape[1], window, self.mulan_stride_samples))
        index = starts[:, None] + np.arange(window)[None, :]          # [windows, window]
        windows = audio[:, index].reshape(-1, window)                   # [batch * windows, window]
        embeddings = model.embed_audio(params, windows).reshape(audio.shape[0], len(starts), -1).mean(axis=1)
        return embeddings / jnp.maximum(jnp.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)

    def __call__(self, variables: dict, audio: dict) -> dict[str, jax.Array]:
        """See the module docstring; audio {rate: [batch, samples]} holds every rate of `sample_rates`."""
        missing = [r for r in self.sample_rates if r not in audio]
        if missing:
            raise ValueError(f"TokenizationForward: no audio at {missing} Hz (inputs at {sorted(audio)})")
        network = self.codec_network
        out = {"codec": network.apply(variables["codec"], audio[self.codec_rate].astype(jnp.float32),
                                      network.rvq.num_quantizers, method=type(network).encode)}
        if self.features is not None:
            s = variables["semantic"]
            x = self.features.embed_fn(s["params"], audio[self.features.sample_rate].astype(jnp.float32))
            out["semantic"] = semantic_lib.nearest_centroids((x - s["mean"]) / s["std"], s["centroids"])
        if self.mulan_model is not None:
            m = variables["mulan"]
            embeddings = self._mulan_embeddings(m["params"], audio[self.mulan_model.sample_rate].astype(jnp.float32))
            out["mulan"], out["mulan_margins"] = vq.rvq_encode_with_margins(embeddings, m["codebooks"])
        return out


def from_tokenizers(codec, semantic_tokenizer=None, mulan=None) -> tuple[TokenizationForward, dict]:
    """(forward, variables) of loaded inference objects: a codec.Codec, a semantic.SemanticTokenizer and a
    mulan.MuLan with its RVQ (the last two optional), as the job loads them."""
    forward = TokenizationForward(codec.network, codec.sample_rate,
                                  None if semantic_tokenizer is None else semantic_tokenizer.features,
                                  None if mulan is None else mulan.model,
                                  1 if mulan is None else mulan.stride)
    variables = {"codec": codec.variables}
    if semantic_tokenizer is not None:
        t = semantic_tokenizer
        variables["semantic"] = {"params": t.features.params, "mean": t.mean, "std": t.std, "centroids": t.centroids}
    if mulan is not None:
        variables["mulan"] = {"params": mulan_audio_params(mulan.params),
                              "codebooks": mulan.conditioning_rvq().codebooks}
    return forward, variables


def mulan_audio_params(params: dict) -> dict:
    """MuLan's parameters without the text tower and projection (what embed_audio reads)."""
    return {k: v for k, v in params.items() if not k.startswith("text_")}


def model_from_gin(gin_file: str, bindings: Sequence[str] = ()) -> Any:
    """The MODEL of a model gin file (gin/models/*.gin), built in a private gin configuration. Macros such a
    file leaves to the run (MODEL_DIR, MIXTURE_OR_TASK_NAME) default to None."""
    import gin

    from musiclm_jax import gin_utils
    with gin_utils.private_config():
        gin_utils.parse_gin([gin_file], ["MODEL_DIR = None", "MIXTURE_OR_TASK_NAME = None", *bindings],
                            finalize=False)
        try:
            return copy.deepcopy(gin.query_parameter("MODEL/macro.value"))
        except ValueError as e:
            raise ValueError(f"{gin_file} binds no MODEL macro (a model gin file of gin/models/)") from e


def semantic_fit_settings(fit_gin: str) -> dict[str, Any]:
    """layer, frame_pooling, num_clusters and pitch_class_share of a semantic tokenizer's fit gin file
    (fit_semantic.fit_semantic_tokenizer), read in a private gin configuration."""
    from musiclm_jax import gin_utils
    with gin_utils.private_config():
        gin_utils.parse_gin([fit_gin], ["FEATURE_CHECKPOINT = None", "OUTPUT_DIR = None"], finalize=False)
        return gin_utils.bound_arguments(
            "fit_semantic.fit_semantic_tokenizer", ("layer", "frame_pooling", "num_clusters", "pitch_class_share"),
            {"frame_pooling": 1, "pitch_class_share": 0.0})


def feature_dim(features: semantic_lib.FeatureExtractor, params: Any) -> int:
    """Dimension of `features`' output (the k-means space) for its (possibly abstract) params."""
    return int(jax.eval_shape(features.embed_fn, params,
                              jax.ShapeDtypeStruct((1, features.sample_rate), jnp.float32)).shape[-1])


def aot_setup(codec_gin: str, semantic_gin: Optional[str] = None, semantic_fit_gin: Optional[str] = None,
              mulan_gin: Optional[str] = None, mulan_rvq_levels: int = 12, mulan_rvq_codebook_size: int = 1024,
              chunk_seconds: float = 30.0, batch_size: int = 512, dataset_hours: float = 280_000.0,
              mesh_config: Optional[partitioning.MeshConfig] = None,
              logical_axis_rules: Optional[Sequence] = None, melody_rate: Optional[float] = 5.0) -> dict[str, Any]:
    """What `python -m musiclm_jax.aot --job=tokenize` compiles, bound by gin (gin/tokenize/aot_paper.gin): the
    frozen tokenizers' models as their model gin files state them; the semantic tokenizer's layer, pooling and
    cluster count from its fit gin file (fit_semantic.fit_semantic_tokenizer); MuLan's conditioning RVQ (12 x 1024
    in the paper); chunks of chunk_seconds in global batches of batch_size; the dataset size the floor is stated
    for (MusicLM's semantic stage trained on 280,000 hours). mesh_config (default: every device on 'data') and
    logical_axis_rules (default: partitioning's) lay it out. melody_rate: the melody tokens' rate in Hz (None: no
    melody tokens), as gin/tokenize/base.gin's tokenize_dataset.melody_rate; the planned token cache states it
    (`python -m musiclm_jax.aot --job=token_manifest`), the compiled forward does not compute it (host work)."""
    return dict(codec_gin=codec_gin, semantic_gin=semantic_gin, semantic_fit_gin=semantic_fit_gin,
                mulan_gin=mulan_gin, mulan_rvq_levels=mulan_rvq_levels,
                mulan_rvq_codebook_size=mulan_rvq_codebook_size, chunk_seconds=chunk_seconds,
                batch_size=batch_size, dataset_hours=dataset_hours,
                mesh_config=mesh_config or partitioning.MeshConfig(), logical_axis_rules=logical_axis_rules,
                melody_rate=melody_rate)
