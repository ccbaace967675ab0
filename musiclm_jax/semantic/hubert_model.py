"""HuBERT / MERT as a frozen feature model: the BaseModel wrapper of networks.hubert for the semantic tokenizer.

Imported checkpoints (`python -m musiclm_jax.convert hubert --from HF_DIR --to MODEL_DIR`) are run directories of
this model; `checkpoint_loading.load_model(MODEL_DIR)` gives it back with its parameters, and
`model.embed(loaded.params, audio, layer)` the hidden state a semantic tokenizer quantizes. It shares that
interface (sample_rate, frame_rate, num_layers, embed) with w2v_bert_model.W2VBertModel. Training is not
supported: these models are only imported.
"""
from __future__ import annotations

import operator
from typing import Optional

import jax
import jax.numpy as jnp

from musiclm_jax.models import AudioFeatureModel
from musiclm_jax.networks.hubert import Hubert, HubertConfig

_NO_TRAINING = ("HuBERT/MERT are imported as frozen feature extractors; training them is not supported here — "
                "train w2v-BERT instead")


class HubertFeatureModel(AudioFeatureModel):
    """Batches: {'audio': [batch, samples] float32 at `network.sample_rate`} (the raw-audio tasks).

    Args:
      network: the HubertConfig of the imported model.
      segment_samples: samples per example of a batch (input_shapes).
    """

    def __init__(self, network: HubertConfig, segment_samples: int):
        self.network = network
        self.module = Hubert(network)
        self.segment_samples = int(segment_samples)
        if network.num_frames(self.segment_samples) < 1:
            raise ValueError(f"segment_samples={segment_samples} is shorter than the {network.receptive_field} "
                             f"samples that make one frame")

    @property
    def num_layers(self) -> int:
        return self.network.num_hidden_layers

    def num_frames(self, samples: int) -> int:
        """Frames of `samples` input samples (see HubertConfig.num_frames)."""
        return self.network.num_frames(samples)

    def get_initial_variables(self, rng, input_shapes):
        # The parameters do not depend on the length: initialise on a few frames' worth of audio.
        batch, samples = input_shapes["audio"][0], input_shapes["audio"][1]
        short = self.network.receptive_field + 3 * self.network.samples_per_frame
        return self.module.init({"params": rng}, jnp.zeros((batch, min(samples, short)), jnp.float32))

    def embed(self, params, audio: jax.Array, layer: int) -> jax.Array:
        """Hidden state `layer` (0 = the encoder input, l = the output of transformer layer l; for pre-norm models
        the last one has the final layer norm) of audio [batch, samples] -> [batch, frames, hidden_size] fp32."""
        try:
            index = operator.index(layer)
        except TypeError:
            index = -1
        if not 0 <= index <= self.num_layers:
            raise ValueError(f"layer={layer!r}: this model has hidden states 0..{self.num_layers}")
        layer = index
        return self.module.apply({"params": params}, audio, num_layers_to_run=layer)[layer]

    def predict_batch_with_aux(self, params, batch, rng=None, *, flax_mutables=None, **decoder_params):
        """The last hidden state [batch, frames, hidden_size] of batch['audio']; no aux outputs."""
        return self.module.apply({"params": params}, batch["audio"])[-1], {}

    def score_batch(self, params, batch, flax_mutables=None):
        raise NotImplementedError(f"{type(self).__name__} has no likelihood to score: it is a feature extractor "
                                  f"(use embed or predict_batch_with_aux)")

    def loss_fn(self, params, batch, dropout_rng: Optional[jax.Array], flax_mutables=None):
        raise NotImplementedError(_NO_TRAINING)
