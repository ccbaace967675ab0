"""VGGish as a frozen embedding model: the BaseModel wrapper of networks.vggish, and the embedder FAD uses.

Imported weights (`python -m musiclm_jax.convert vggish --from STATE_DICT.pth --to MODEL_DIR`) are run
directories of this model (gin/eval/vggish.gin); `VGGishEmbedder.from_checkpoint(MODEL_DIR)` loads the parameters
only and embeds audio at any sample rate:

    embedder = VGGishEmbedder.from_checkpoint("/ckpt/vggish")
    e = embedder.embed(audio, sample_rate)   # audio [samples] -> [examples, 128] float32, one per 0.96 s

Training is not supported: VGGish is only imported. The parameters carry no logical axis names, so they are
replicated (72M: the first dense layer holds 50M of them).
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.models import RawAudioModel
from musiclm_jax.networks.vggish import VGGish, VGGishConfig, log_mel_examples, pca_postprocess

PCA_FILE = "vggish_pca.npz"
_NO_TRAINING = "VGGish is imported as a frozen embedding model; training it is not supported"


class VGGishModel(RawAudioModel):
    """Batches: {'audio': [batch, segment_samples] float32 at network.sample_rate}.

    Args:
      network: VGGishConfig; segment_samples: samples per example of a batch (input_shapes).
    """

    def __init__(self, network: VGGishConfig = VGGishConfig(), segment_samples: int = 16000):
        self.network = network
        self.module = VGGish(network)
        self.segment_samples = int(segment_samples)
        if network.num_examples(self.segment_samples) < 1:
            raise ValueError(f"segment_samples={segment_samples} is shorter than one VGGish example "
                             f"({network.example_samples} samples)")

    @property
    def sample_rate(self) -> int:
        return self.network.sample_rate

    def get_initial_variables(self, rng, input_shapes):
        examples = jnp.zeros((1, self.network.example_frames, self.network.num_bands), jnp.float32)
        return self.module.init({"params": rng}, examples)

    def embed(self, params, audio: jax.Array) -> jax.Array:
        """audio [batch, samples] at sample_rate -> embeddings [batch, examples, embedding_size] float32."""
        examples = log_mel_examples(audio, self.network)
        b, n = examples.shape[:2]
        return self.module.apply({"params": params}, examples.reshape(b * n, *examples.shape[2:])).reshape(b, n, -1)

    def predict_batch_with_aux(self, params, batch, rng=None, *, flax_mutables=None, **decoder_params):
        """Embeddings [batch, examples, 128] of batch['audio']; no aux outputs."""
        return self.embed(params, batch["audio"]), {}

    def score_batch(self, params, batch, flax_mutables=None):
        raise NotImplementedError("VGGish has no likelihood to score: it is an embedding model (use embed)")

    def loss_fn(self, params, batch, dropout_rng: Optional[jax.Array], flax_mutables=None):
        raise NotImplementedError(_NO_TRAINING)


class VGGishEmbedder:
    """A loaded VGGish: embeds clips at any rate (resampled to 16 kHz with audio_io.resample, a polyphase filter;
    the reference resamples with resampy, so the embeddings of other rates differ slightly from it)."""

    def __init__(self, model: VGGishModel, params, pca: Optional[dict] = None, partitioner=None):
        from musiclm_jax import partitioning
        self.partitioner = partitioner or partitioning.Partitioner(partitioning.create_mesh())
        self.model, self.pca = model, pca
        self.params = jax.device_put(params, self.partitioner.replicated())
        self._embed = jax.jit(model.embed)

    @classmethod
    def from_checkpoint(cls, model_dir: str) -> "VGGishEmbedder":
        from musiclm_jax import checkpoint_loading
        loaded = checkpoint_loading.load_model(model_dir)
        if not isinstance(loaded.model, VGGishModel):
            raise ValueError(f"{model_dir} holds a {type(loaded.model).__name__}, not VGGish")
        pca = None
        if os.path.exists(os.path.join(model_dir, PCA_FILE)):
            with np.load(os.path.join(model_dir, PCA_FILE)) as f:
                pca = {"eigen_vectors": f["eigen_vectors"], "means": f["means"]}
        return cls(loaded.model, jax.device_get(loaded.params), pca)

    @property
    def sample_rate(self) -> int:
        return self.model.sample_rate

    def embed_batch(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """audio [batch, samples] at sample_rate (equal lengths) -> [batch, examples, 128] float32, the batch padded
        to a multiple of the mesh's data-parallel size and laid over the devices (parameters replicated)."""
        from musiclm_jax.data import audio_io
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 2:
            raise ValueError(f"VGGishEmbedder.embed_batch takes [batch, samples]; got shape {audio.shape}")
        if sample_rate != self.sample_rate:
            audio = audio_io.resample(audio, sample_rate, self.sample_rate)
        rows, n = self.partitioner.pad_and_shard(audio)
        return np.asarray(self._embed(self.params, rows))[:n]

    def embed(self, audio: np.ndarray, sample_rate: int, postprocess: bool = False) -> np.ndarray:
        """audio [samples] at sample_rate -> [examples, 128] float32 (one per whole 0.96 s; a clip shorter than
        0.975 s is an error naming its length). postprocess=True applies the AudioSet PCA, whitening and 8-bit
        quantization (needs the PCA converted with the weights; FAD does not use it)."""
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1:
            raise ValueError(f"VGGishEmbedder.embed takes one mono clip [samples]; got shape {audio.shape}")
        embeddings = self.embed_batch(audio[None], sample_rate)[0]
        if postprocess:
            if self.pca is None:
                raise ValueError(f"this VGGish has no PCA ({PCA_FILE}); convert it with --pca")
            embeddings = pca_postprocess(embeddings, self.pca["eigen_vectors"], self.pca["means"])
        return embeddings
