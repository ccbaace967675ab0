"""The model interface (as in t5x) and the token language model used by the three MusicLM stages.

One trainer, partitioner and checkpointer serve every model through `BaseModel`:

  get_initial_variables(rng, input_shapes) -> Flax variables (with logical-axis boxes)
  loss_fn(params, batch, dropout_rng)      -> (scalar loss, metrics)     dropout_rng None = deterministic
  eval_fn(params, batch)                   -> metrics
  predict_batch_with_aux(params, batch, rng, **decoder_params) -> (predictions, aux)
  score_batch(params, batch)               -> [batch] scores

Models with non-trainable state that training updates (codebook statistics of a quantizer) keep it in other
Flax collections ("flax_mutables"); they receive it through the `flax_mutables` arguments and return its new
value from `train_loss_fn`, which is what the trainer differentiates.

Metrics are dicts of fp32 scalars; the key `loss_weight` (e.g. the number of target tokens) tells the trainer
how to weight a microbatch when it accumulates gradients and averages metrics.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from musiclm_jax.generation import decoding
from musiclm_jax.networks.transformer import DecoderOnlyTransformer, TransformerConfig
from musiclm_jax.generation.token_layout import PAD_ID, TokenLayout

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


class BaseModel(abc.ABC):
    """What the trainer, evaluator and partitioner need from a model.

    `feature_converter_name` names the seqio feature converter (data.feature_converters) that turns task
    examples into this model's batches; models do not import seqio themselves.
    """

    feature_converter_name: str = ""

    @property
    def feature_converter_kwargs(self) -> dict:
        """Arguments of the feature converter (e.g. a vocabulary path); none by default. Reads only: what they name
        must exist (see prepare_assets)."""
        return {}

    def prepare_assets(self) -> None:
        """Creates the files the model's input needs (MuLan: its caption vocabulary) if they do not exist. The train
        job calls it once, before it reads any input; nothing else creates them (inference and properties only
        read). Default: nothing to create."""

    @property
    def vocab_size(self) -> Optional[int]:
        """Token ids the model accepts (checked against the task's vocabularies), None if not a token model."""
        return None

    @abc.abstractmethod
    def get_initial_variables(self, rng: jax.Array, input_shapes: Mapping[str, Sequence[int]]) -> Any:
        """Flax variables for inputs of `input_shapes` ({feature: shape}); parameters carry logical names."""

    def train_flops_per_example(self) -> float:
        """Analytic model FLOPs of one training example (forward + backward), for MFU and the AOT estimate."""
        raise NotImplementedError(f"{type(self).__name__} does not state its FLOPs")

    @abc.abstractmethod
    def input_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        """Shapes of a training batch of `batch_size` examples: {feature: shape}."""

    def input_dtypes(self) -> dict[str, Any]:
        """dtype of each input feature (default int32 tokens)."""
        return {k: jnp.int32 for k in self.input_shapes(1)}

    @abc.abstractmethod
    def loss_fn(self, params: Any, batch: Batch, dropout_rng: Optional[jax.Array],
                flax_mutables: Optional[dict] = None) -> tuple[jax.Array, Metrics]:
        """(scalar loss to minimise, metrics). dropout_rng None means deterministic (evaluation)."""

    def train_loss_fn(self, params: Any, flax_mutables: dict, batch: Batch,
                      dropout_rng: jax.Array) -> tuple[jax.Array, tuple[Metrics, dict]]:
        """What the trainer differentiates: (loss, (metrics, updated flax_mutables)). Default: no state."""
        loss, metrics = self.loss_fn(params, batch, dropout_rng, flax_mutables)
        return loss, (metrics, flax_mutables)

    def eval_fn(self, params: Any, batch: Batch, flax_mutables: Optional[dict] = None) -> Metrics:
        """Metrics on an evaluation batch (deterministic)."""
        return self.loss_fn(params, batch, None, flax_mutables)[1]

    @abc.abstractmethod
    def predict_batch_with_aux(self, params: Any, batch: Batch, rng: Optional[jax.Array] = None,
                               **decoder_params) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Predictions for a batch and auxiliary outputs (e.g. log-probabilities)."""

    def predict_batch(self, params: Any, batch: Batch, rng: Optional[jax.Array] = None, **decoder_params):
        return self.predict_batch_with_aux(params, batch, rng, **decoder_params)[0]

    @abc.abstractmethod
    def score_batch(self, params: Any, batch: Batch) -> jax.Array:
        """[batch] scores (log-likelihood of each example's targets)."""


def cross_entropy(logits: jax.Array, targets: jax.Array, z_loss: float = 0.0,
                  label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and z-loss (z * logsumexp^2), fp32.

    Args:
      logits: [..., V] fp32; targets: [...] int32.
    Returns:
      (cross entropy [...], z loss [...]) in nats.
    """
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    if label_smoothing > 0.0:
        nll = (1.0 - label_smoothing) * nll + label_smoothing * (log_z - jnp.mean(logits, axis=-1))
    return nll, z_loss * jnp.square(log_z)


class RawAudioModel(BaseModel):
    """Base of the models trained on raw audio (codec, w2v-BERT, imported feature models): batches
    {'audio': [batch, segment_samples] float32} from the raw-audio tasks. Subclasses set `segment_samples`."""

    feature_converter_name = "audio"
    segment_samples: int

    def input_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        return {"audio": (batch_size, self.segment_samples)}

    def input_dtypes(self) -> dict[str, Any]:
        return {"audio": jnp.float32}


class AudioFeatureModel(RawAudioModel):
    """A raw-audio model whose layers give features (w2v-BERT, imported HuBERT/MERT): what the semantic tokenizer
    uses. Subclasses hold `network` (a config with sample_rate and frame_rate) and define `num_layers` and
    `embed(params, audio [batch, samples], layer) -> [batch, frames, dim]`."""

    network: Any

    @property
    def sample_rate(self) -> int:
        return self.network.sample_rate

    @property
    def frame_rate(self) -> float:
        """Feature frames per second."""
        return self.network.frame_rate

    @abc.abstractmethod
    def embed(self, params: Any, audio: jax.Array, layer: int) -> jax.Array:
        """Hidden state `layer` (0 = the first block's input) of audio [batch, samples] -> [batch, frames, dim]."""


class TokenLMModel(BaseModel):
    """A decoder-only prefix LM over the tokens of a TokenLayout.

    Training batches (from data.feature_converters.PrefixLMFeatureConverter), all [batch, length]:
      decoder_input_tokens   the sequence [prefix | targets] shifted right, PAD (0) first
      decoder_target_tokens  the sequence [prefix | targets]
      decoder_loss_weights   1 on target tokens, 0 on prefix and padding (loss only on targets)
      decoder_causal_attention 1 on the prefix positions (and the one predicting the first target)

    Prediction batches: `prefix_tokens` [batch, P] global ids (conditioning, then any prompt target tokens).

    Args:
      network: the Transformer's config; its vocab_size is taken from the layout (if set, it must match).
      layout: the stage's token groups.
      prefix_groups: groups that form the prefix, in order, e.g. ('mulan',) or ('mulan', 'semantic').
      target_group: the group the stage predicts, e.g. 'semantic' or 'coarse'.
      prefix_length, target_length: tokens of prefix and targets in a training sequence.
      z_loss, label_smoothing: regularisers of the loss.
      guidance_groups: the prefix groups that conditioning_dropout drops in training (MuLan's tokens), e.g.
        ('mulan',). Classifier-free guidance's unconditional input drops these and the optional groups
        (`unconditional_groups`).
      conditioning_dropout: probability that a training example's guidance-group tokens are replaced by PAD
        (the "unconditional" input that guidance contrasts with), drawn per example from the dropout key.
      optional_groups: {prefix group: probability}: conditioning that may be absent at inference (the melody
        tokens), replaced by PAD in a training example with its own probability, drawn independently of the
        guidance drop; generation without it gives PAD tokens in its place. Guidance's unconditional input drops
        them too, as MusicGen's drops its text and melody together, so guidance amplifies a given melody's effect
        on the logits as it does the caption's (README, Generation).
      time_aligned_groups: prefix groups whose tokens are placed by time (see `positions`): a target token and
        the conditioning tokens of the same moment are then at relative distance 0 wherever they are in the
        sequence, so a small stage can find "the semantic token of this codec frame" (by sequence index that
        distance grows with the frame: 50 + 1.5 t tokens for the tiny coarse stage). Each group's tokens per
        second follow from the lengths: the time-aligned groups cover the targets' duration with the same number
        of frames each (the coarse stage's melody and semantic tokens: one of each per semantic frame), every
        other prefix group is one frame (its `levels` tokens, e.g. MuLan's 12).
    """

    feature_converter_name = "prefix_lm"

    def __init__(self, network: TransformerConfig, layout: TokenLayout, prefix_groups: Sequence[str],
                 target_group: str, prefix_length: int, target_length: int, z_loss: float = 0.0,
                 label_smoothing: float = 0.0, guidance_groups: Sequence[str] = (),
                 conditioning_dropout: float = 0.0, optional_groups: Optional[Mapping[str, float]] = None,
                 time_aligned_groups: Sequence[str] = ()):
        if network.vocab_size is None:
            network = dataclasses.replace(network, vocab_size=layout.vocab_size)
        if network.vocab_size != layout.vocab_size:
            raise ValueError(f"network vocab_size={network.vocab_size} but the token layout needs "
                             f"{layout.vocab_size} ids ({layout.groups})")
        if prefix_length and not prefix_groups:
            raise ValueError(f"prefix_length={prefix_length} but no prefix_groups")
        for name in list(prefix_groups) + [target_group]:
            layout.group(name)  # raises KeyError naming the group
        if not set(guidance_groups) <= set(prefix_groups):
            raise ValueError(f"guidance_groups {tuple(guidance_groups)} must be prefix groups {tuple(prefix_groups)}")
        if not 0.0 <= conditioning_dropout < 1.0:
            raise ValueError(f"conditioning_dropout={conditioning_dropout} must be in [0, 1)")
        if conditioning_dropout and not guidance_groups:
            raise ValueError("conditioning_dropout needs guidance_groups (the prefix groups it drops)")
        optional_groups = dict(optional_groups or {})
        for name, p in optional_groups.items():
            if name not in prefix_groups or name in guidance_groups:
                raise ValueError(f"optional_groups: {name!r} must be a prefix group {tuple(prefix_groups)} and not a "
                                 f"guidance group")
            if not 0.0 <= p < 1.0:
                raise ValueError(f"optional_groups[{name!r}]={p} must be in [0, 1)")
        self.network = network
        self.layout = layout
        self.time_aligned_groups = tuple(time_aligned_groups)
        self.ticks_per_frame = self._ticks_per_frame(layout, tuple(prefix_groups), target_group, int(prefix_length),
                                                     int(target_length), self.time_aligned_groups)
        self.prefix_groups = tuple(prefix_groups)
        self.target_group = target_group
        self.prefix_length = int(prefix_length)
        self.target_length = int(target_length)
        self.z_loss = z_loss
        self.label_smoothing = label_smoothing
        self.guidance_groups = tuple(guidance_groups)
        self.conditioning_dropout = float(conditioning_dropout)
        self.optional_groups = {k: float(v) for k, v in optional_groups.items()}
        self.module = DecoderOnlyTransformer(network)

    @property
    def vocab_size(self) -> int:
        return self.layout.vocab_size

    @property
    def unconditional_groups(self) -> tuple[str, ...]:
        """The prefix groups set to PAD in classifier-free guidance's unconditional input: the guidance groups,
        then the optional groups (disjoint, both dropped in training, so the model knows the input without them)."""
        return self.guidance_groups + tuple(self.optional_groups)

    @staticmethod
    def _ticks_per_frame(layout, prefix_groups, target_group, prefix_length, target_length, aligned):
        """{aligned group: target tokens per frame of that group}, from the training lengths. Several aligned
        groups have one frame each per time step (e.g. the melody token of each semantic frame beside it)."""
        for name in aligned:
            if name not in prefix_groups:
                raise ValueError(f"time_aligned_groups: {name!r} is not a prefix group {prefix_groups}")
        if len(set(aligned)) != len(aligned):
            raise ValueError(f"time_aligned_groups={aligned} names a group twice")
        if not aligned:
            return {}
        one_frame = sum(layout.group(g).levels for g in prefix_groups if g not in aligned)
        tokens = prefix_length - one_frame
        levels = sum(layout.group(g).levels for g in aligned)
        if tokens <= 0 or tokens % levels:
            raise ValueError(f"time_aligned_groups: prefix_length={prefix_length} leaves {tokens} tokens for "
                             f"{aligned} after one frame of each other prefix group ({one_frame} tokens); it must be "
                             f"a positive multiple of their {levels} levels per frame")
        return {name: target_length / (tokens // levels) for name in aligned}

    def positions(self, tokens: jax.Array) -> Optional[jax.Array]:
        """Positions [batch, length] int32 of input tokens [batch, length] (PAD first, as fed to the decoder),
        or None without time_aligned_groups (the sequence index is the position).

        The target group's tokens keep their sequence index, so decoding steps need no positions. A token of a
        time-aligned group that belongs to frame f (its group's f-th frame in the sequence) and level l is placed
        at start + floor((f + l / levels) * ticks), where start is the index of the first target token (the
        sequence length when there is none yet: where the first sampled one will go) and ticks the target tokens
        per frame of the group: it sits where the target tokens of the same moment sit. Other tokens (MuLan,
        PAD) keep their sequence index.
        """
        if not self.ticks_per_frame:
            return None
        length = tokens.shape[1]
        index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
        low, high = self.layout.id_range(self.target_group)
        is_target = (tokens >= low) & (tokens < high)
        start = jnp.where(jnp.any(is_target, axis=1), jnp.argmax(is_target, axis=1), length).astype(jnp.int32)
        positions = index
        for name, ticks in self.ticks_per_frame.items():
            group = self.layout.group(name)
            low, high = self.layout.id_range(name)
            member = (tokens >= low) & (tokens < high)
            frame = (jnp.cumsum(member, axis=1) - 1) // group.levels
            level = (tokens - low) // group.codebook_size
            tick = jnp.floor((frame + level / group.levels) * ticks).astype(jnp.int32)
            positions = jnp.where(member, start[:, None] + tick, positions)
        return positions

    @property
    def sequence_length(self) -> int:
        return self.prefix_length + self.target_length

    def train_flops_per_example(self) -> float:
        return self.sequence_length * self.network.train_flops_per_token(self.sequence_length)

    def input_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        shape = (batch_size, self.sequence_length)
        return {k: shape for k in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                                   "decoder_causal_attention")}

    def get_initial_variables(self, rng, input_shapes):
        tokens = jnp.zeros(input_shapes["decoder_input_tokens"], jnp.int32)
        return self.module.init({"params": rng}, tokens, jnp.zeros_like(tokens), self.positions(tokens),
                                deterministic=True)

    def logits(self, params, batch: Batch, dropout_rng: Optional[jax.Array] = None) -> jax.Array:
        """Teacher-forced logits [batch, length, vocab] fp32."""
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
        tokens = batch["decoder_input_tokens"]
        return self.module.apply({"params": params}, tokens, batch.get("decoder_causal_attention"),
                                 self.positions(tokens), deterministic=dropout_rng is None, rngs=rngs)

    def is_guidance_token(self, tokens: jax.Array, groups: Optional[Sequence[str]] = None) -> jax.Array:
        """bool, same shape as tokens (global ids): the token belongs to a guidance group (or to `groups`)."""
        hit = jnp.zeros(tokens.shape, bool)
        for name in self.guidance_groups if groups is None else groups:
            low = self.layout.offset(name)
            group = self.layout.group(name)
            hit |= (tokens >= low) & (tokens < low + group.levels * group.codebook_size)
        return hit

    def drop_conditioning(self, batch: Batch, drop: jax.Array, groups: Optional[Sequence[str]] = None) -> Batch:
        """The batch with the guidance-group (or `groups`) prefix tokens of the examples where drop [B] is True
        set to PAD."""
        targets, inputs = batch["decoder_target_tokens"], batch["decoder_input_tokens"]
        is_prefix = batch["decoder_loss_weights"] == 0
        dropped = self.is_guidance_token(targets, groups) & is_prefix & drop[:, None]
        shifted = jnp.pad(dropped[:, :-1], ((0, 0), (1, 0)))  # input position i holds target i - 1
        return dict(batch, decoder_target_tokens=jnp.where(dropped, PAD_ID, targets),
                    decoder_input_tokens=jnp.where(shifted, PAD_ID, inputs))

    def loss_fn(self, params, batch, dropout_rng, flax_mutables=None):
        del flax_mutables  # the LM has no state besides its parameters
        if self.conditioning_dropout and dropout_rng is not None:
            dropout_rng, drop_rng = jax.random.split(dropout_rng)
            drop = jax.random.bernoulli(drop_rng, self.conditioning_dropout,
                                        (batch["decoder_target_tokens"].shape[0],))
            batch = self.drop_conditioning(batch, drop)
        for name, p in self.optional_groups.items():
            if p and dropout_rng is not None:
                dropout_rng, drop_rng = jax.random.split(dropout_rng)
                drop = jax.random.bernoulli(drop_rng, p, (batch["decoder_target_tokens"].shape[0],))
                batch = self.drop_conditioning(batch, drop, (name,))
        logits = self.logits(params, batch, dropout_rng)
        targets = batch["decoder_target_tokens"]
        weights = batch["decoder_loss_weights"].astype(jnp.float32)
        nll, z = cross_entropy(logits, targets, self.z_loss, self.label_smoothing)
        num_tokens = jnp.sum(weights)
        denominator = jnp.maximum(num_tokens, 1.0)
        ce = jnp.sum(nll * weights) / denominator
        z_loss = jnp.sum(z * weights) / denominator
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        metrics = {
            "loss": ce + z_loss,
            "cross_entropy": ce,
            "z_loss": z_loss,
            "accuracy": jnp.sum(correct * weights) / denominator,
            "loss_weight": num_tokens,
        }
        return ce + z_loss, metrics

    def score_batch(self, params, batch):
        logits = self.logits(params, batch)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        target_lp = jnp.take_along_axis(logprobs, batch["decoder_target_tokens"][..., None], axis=-1)[..., 0]
        return jnp.sum(target_lp * batch["decoder_loss_weights"], axis=-1)

    # ------------------------------------------------------------------------------------------- decoding
    def init_cache(self, batch_size: int, capacity: int) -> Any:
        """An empty KV cache for `batch_size` sequences of up to `capacity` tokens (zeros; 'cache' collection)."""
        tokens = jnp.zeros((batch_size, capacity), jnp.int32)
        shapes = jax.eval_shape(lambda: self.module.init({"params": jax.random.key(0)}, tokens, None,
                                                         self.positions(tokens), decode=True))
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])

    def decode_step(self, params, tokens, cache, prefix_mask=None, prefill: bool = False):
        """Feeds tokens [B, q] at the cache's current position: (logits [B, q, V] fp32, updated cache).

        prefix_mask [B, q] marks the bidirectional prefix (the whole prefix must come in one call). With
        time_aligned_groups the first call (prefill=True, at cache index 0) must hold the whole prefix, PAD
        first: its tokens are placed by `positions`; later calls feed target tokens at their sequence index.
        """
        positions = self.positions(tokens) if prefill else None
        logits, mutated = self.module.apply({"params": params, "cache": cache}, tokens, prefix_mask, positions,
                                            decode=True, mutable=["cache"])
        return logits, mutated["cache"]

    def decoder_functions(self):
        """(prefill, step) of the KV-cached decoder, as decoding.sample_after_prefix takes them (and as
        `python -m musiclm_jax.export` exports them): prefill(params, tokens [N, P], prefix_mask [N, P],
        slots int8 [C]) -> (last-position logits [N, V], cache of capacity C); step(params, tokens [N, 1],
        cache) -> (logits [N, V], cache)."""

        def prefill(params, tokens, prefix_mask, slots):
            cache = self.init_cache(tokens.shape[0], slots.shape[0])
            logits, cache = self.decode_step(params, tokens, cache, prefix_mask, prefill=True)
            return logits[:, -1], cache

        def step(params, tokens, cache):
            logits, cache = self.decode_step(params, tokens, cache)
            return logits[:, -1], cache
        return prefill, step

    def predict_batch_with_aux(self, params, batch, rng=None, *, numdecode_steps: Optional[int] = None,
                               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                               prompt_target_length: int = 0, guidance_scale: float = 1.0):
        """Samples target tokens after `batch['prefix_tokens']`.

        Args:
          batch: {'prefix_tokens': [B, P] int32 global ids}; the last `prompt_target_length` of them are
            already-known target tokens (continuation), the rest are conditioning.
          rng: one key (split per example) or [B] keys (one per example).
          numdecode_steps: new tokens to draw (default: target_length - prompt_target_length).
          temperature, top_k, top_p: sampling settings; temperature 0 is greedy.
          guidance_scale: classifier-free guidance. 1 is plain conditional sampling (no extra compute); otherwise
            the batch runs twice, with and without the `unconditional_groups` tokens (PAD instead), and tokens are drawn
            from logits_uncond + guidance_scale * (logits_cond - logits_uncond).
        Returns:
          (tokens [B, numdecode_steps] global ids, {'logprobs': [B, numdecode_steps]} under the distribution
          sampled from, before temperature and top-k/top-p).
        """
        steps = numdecode_steps if numdecode_steps is not None else self.target_length - prompt_target_length
        if guidance_scale != 1.0 and not self.guidance_groups:
            raise ValueError(f"guidance_scale={guidance_scale} needs a model with guidance_groups")
        prefill, step = self.decoder_functions()
        tokens, logprobs = decoding.sample_after_prefix(
            prefill, step, params, jnp.asarray(batch["prefix_tokens"], jnp.int32), rng, num_steps=steps,
            level_ranges=self.layout.level_ranges(self.target_group), prompt_length=prompt_target_length,
            guidance_ranges=tuple(self.layout.id_range(g) for g in self.unconditional_groups),
            guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p)
        return tokens, {"logprobs": logprobs}
