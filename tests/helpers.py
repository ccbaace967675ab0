"""Small builders shared by tests (tiny models and meshes)."""
from __future__ import annotations

import jax
import numpy as np

from musiclm_jax import partitioning
from musiclm_jax.models import TokenLMModel
from musiclm_jax.networks.transformer import TransformerConfig
from musiclm_jax.generation.token_layout import TokenLayout

TINY_LAYOUT = TokenLayout.from_tuples((("mulan", 12, 32), ("semantic", 1, 64)))


def planned_token_dir(size: str = "tiny") -> str:
    """aot.planned_token_dir: a manifest-only token cache of the `size` tokenizers, once per test process."""
    from musiclm_jax import aot
    return aot.planned_token_dir(size)


def tiny_model(prefix_length: int = 12, target_length: int = 20, layout: TokenLayout = TINY_LAYOUT,
               target_group: str = "semantic", prefix_groups=("mulan",), **network) -> TokenLMModel:
    cfg = dict(embed_dim=32, num_layers=2, num_heads=4, head_dim=8, mlp_dim=64)
    cfg.update(network)
    return TokenLMModel(TransformerConfig(**cfg), layout, prefix_groups, target_group, prefix_length,
                        target_length)


def init_params(model: TokenLMModel, seed: int = 0):
    return partitioning.unbox(model.get_initial_variables(jax.random.key(seed), model.input_shapes(2))["params"])


def random_batch(model: TokenLMModel, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A prefix-LM batch of random valid tokens in the feature converter's layout."""
    rng = np.random.RandomState(seed)
    layout = model.layout
    prefix = np.concatenate([rng.randint(lo, hi, (batch_size, 1))
                             for lo, hi in np.resize(layout.level_ranges(model.prefix_groups[0]),
                                                     (model.prefix_length, 2))], axis=1)
    ranges = np.resize(layout.level_ranges(model.target_group), (model.target_length, 2))
    targets = np.concatenate([rng.randint(lo, hi, (batch_size, 1)) for lo, hi in ranges], axis=1)
    seq = np.concatenate([prefix, targets], axis=1).astype(np.int32)
    inputs = np.concatenate([np.zeros((batch_size, 1), np.int32), seq[:, :-1]], axis=1)
    weights = np.concatenate([np.zeros((batch_size, model.prefix_length)), np.ones((batch_size, model.target_length))],
                             axis=1).astype(np.int32)
    causal = (np.arange(seq.shape[1]) <= model.prefix_length).astype(np.int32)[None].repeat(batch_size, 0)
    return {"decoder_input_tokens": inputs, "decoder_target_tokens": seq, "decoder_loss_weights": weights,
            "decoder_causal_attention": causal}


def harmonic_notes(midis, seconds_each: float = 0.4, rate: int = 24000) -> np.ndarray:
    """A sequence of notes (MIDI numbers, A4 = 69 = 440 Hz), each with partials 1-3 at amplitudes 0.2 / k:
    float32 [len(midis) * seconds_each * rate]."""
    t = np.arange(int(seconds_each * rate)) / rate
    return np.concatenate([sum(0.2 / k * np.sin(2 * np.pi * k * 440.0 * 2 ** ((m - 69) / 12) * t) for k in (1, 2, 3))
                           for m in midis]).astype(np.float32)


def mesh(data: int, model: int, fsdp: int = 1, devices=None):
    return partitioning.mesh_from_shape({"data": data, "fsdp": fsdp, "model": model}, devices)


def write_frozen_tiny_tokenizers(root: str, semantic_clusters: int = 16, mulan_codes: int = 16) -> dict[str, str]:
    """Random-init tiny codec (gin/codec/tiny.gin: 24 kHz, 50 Hz, 4 x 512) and w2v-BERT run directories, a
    `semantic_clusters`-cluster semantic tokenizer fitted on the latter (2 k-means steps), and a random-init tiny
    MuLan with a 12 x `mulan_codes` conditioning RVQ: {'codec', 'w2v_bert', 'semantic', 'mulan'}. With 64 and 32
    the sizes are those of the tiny stages' gin files."""
    import os

    from musiclm_jax import fit_semantic, run_directory
    from musiclm_jax.fit_rvq import fit_rvq
    paths = {name: os.path.join(root, name) for name in ("codec", "w2v_bert", "semantic", "mulan")}
    run_directory.write_run_directory(paths["codec"], "gin/codec/tiny.gin", [], seed=1)
    run_directory.write_run_directory(paths["w2v_bert"], "gin/w2v_bert/tiny.gin", [], seed=2)
    fit_semantic.main(["--gin_file=gin/semantic/kmeans_tiny.gin", f"--gin.FEATURE_CHECKPOINT='{paths['w2v_bert']}'",
                   f"--gin.OUTPUT_DIR='{paths['semantic']}'", f"--gin.NUM_CLUSTERS={semantic_clusters}",
                   "--gin.fit_semantic.fit_semantic_tokenizer.num_steps=2",
                   "--gin.fit_semantic.fit_semantic_tokenizer.normalization_batches=1"])
    run_directory.write_run_directory(paths["mulan"], "gin/mulan/tiny.gin", [], seed=3)
    fit_rvq(paths["mulan"], num_clips=max(48, 2 * mulan_codes), levels=12, codebook_size=mulan_codes, steps=3)
    return paths


def write_tiny_run_directories(root, semantic_tokenizer: bool = False):
    """Run directories of tiny random-init models under `root` (a pathlib.Path), as training writes them: codec,
    MuLan with a caption vocabulary and a random 12 x 32 conditioning RVQ (fitting one tests nothing here), the
    three stages of gin/stages/*_tiny.gin, and with semantic_tokenizer a tiny w2v-BERT ('w2v_bert') and its
    k-means tokenizer ('tokenizer', which continuation needs). Returns root."""
    from musiclm_jax import fit_semantic, run_directory
    from musiclm_jax.mulan import inference as mulan
    from musiclm_jax.mulan import text_vocab
    run_directory.write_run_directory(str(root / "codec"), "gin/codec/tiny.gin", [], seed=1)
    run_directory.write_run_directory(str(root / "mulan"), "gin/mulan/tiny.gin", [], seed=2)
    codebooks = np.random.RandomState(0).randn(12, 32, 128) * (0.5 ** np.arange(12))[:, None, None] / np.sqrt(128)
    mulan.ConditioningRVQ(codebooks).save(str(root / "mulan" / mulan.RVQ_FILE))
    # The tiny MuLan was never trained, so it has no caption vocabulary: give it one from the synthetic captions.
    text_vocab.ensure_vocabulary(str(root / "mulan"), "synthetic_music_16000hz", 512, max_captions=2000)
    if semantic_tokenizer:
        run_directory.write_run_directory(str(root / "w2v_bert"), "gin/w2v_bert/tiny.gin", [], seed=6)
        fit_semantic.main(["--gin_file=gin/semantic/kmeans_tiny.gin",
                       f"--gin.FEATURE_CHECKPOINT='{root / 'w2v_bert'}'", f"--gin.OUTPUT_DIR='{root / 'tokenizer'}'",
                       "--gin.fit_semantic.fit_semantic_tokenizer.num_steps=2",
                       "--gin.fit_semantic.fit_semantic_tokenizer.normalization_batches=1"])
    for i, stage in enumerate(("semantic", "coarse", "fine")):
        run_directory.write_run_directory(str(root / stage), f"gin/stages/{stage}_tiny.gin",
                                               [f"TOKEN_DIR = '{planned_token_dir()}'"], seed=3 + i)
    return root


def adam_steps(model, params, mutables: dict, batch: dict, steps: int, learning_rate: float):
    """`steps` jitted Adam steps of model.train_loss_fn on one fixed batch, step i with rng jax.random.key(i) ->
    (params, mutables, [each step's metrics])."""
    import optax
    tx = optax.adam(learning_rate)

    @jax.jit
    def step(params, opt_state, mutables, key):
        (_, (metrics, mutables)), grads = jax.value_and_grad(model.train_loss_fn, has_aux=True)(
            params, mutables, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, mutables, metrics

    opt_state, history = tx.init(params), []
    for i in range(steps):
        params, opt_state, mutables, metrics = step(params, opt_state, mutables, jax.random.key(i))
        history.append(metrics)
    return params, mutables, history


TINY_VGGISH = ["vggish.VGGishConfig.hidden_size = 32"]
TINY_PASST = ["passt.PaSSTConfig.embed_dim = 48", "passt.PaSSTConfig.depth = 1", "passt.PaSSTConfig.num_heads = 4"]


def write_tiny_evaluation_models(root) -> dict[str, str]:
    """Random-init run directories of the field's evaluation models at tiny widths (no torch needed): VGGish
    (gin/eval/vggish.gin, 32-wide dense layers, the released front end and 128-d output) and PaSST
    (gin/eval/passt.gin, one 48-wide block, the released front end and 527 classes), as `convert` writes them.
    Returns {'vggish': dir, 'passt': dir} under `root` (a pathlib.Path)."""
    from musiclm_jax import run_directory
    dirs = {"vggish": str(root / "vggish"), "passt": str(root / "passt")}
    run_directory.write_run_directory(dirs["vggish"], "gin/eval/vggish.gin", TINY_VGGISH, seed=7)
    run_directory.write_run_directory(dirs["passt"], "gin/eval/passt.gin", TINY_PASST, seed=8)
    return dirs


CLAP_WORDS = ["<s>", "<pad>", "</s>", "<unk>", "calm", "piano", "loud", "drums", "a", "with", "slow", "fast", "guitar"]
CLAP_FEATURES = {"sampling_rate": 16000, "hop_length": 160, "fft_window_size": 512, "max_length_s": 1,
                 "frequency_min": 50, "frequency_max": 8000, "feature_size": 64}


def small_clap_model(max_position_embeddings: int = 40):
    """A random-initialised small transformers ClapModel (HTSAT audio tower, RoBERTa-style text tower over
    CLAP_WORDS, 24-dimensional projections), every weight moved off its initial value so that each one matters
    (needs the `convert` extra). Captions of up to max_position_embeddings - 3 tokens fit its text tower."""
    import torch
    import transformers
    torch.manual_seed(0)
    audio = dict(patch_embeds_hidden_size=16, hidden_size=64, spec_size=128, num_mel_bins=64, patch_size=4,
                 patch_stride=(4, 4), window_size=8, depths=(2, 1, 2), num_attention_heads=(2, 2, 4))
    text = dict(vocab_size=len(CLAP_WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=max_position_embeddings, pad_token_id=1)
    config = transformers.ClapConfig(text_config=text, audio_config=audio, projection_dim=24)
    model = transformers.ClapModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0.0, 1.0)
            elif p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
            elif p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
    return model


def write_word_tokenizer(path, words=CLAP_WORDS):
    """A word-level tokenizer.json over `words` (<s> $A </s>, unknown words -> <unk>), as CLAP's folder holds its
    BPE one; returns the tokenizers.Tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.save(str(path))
    return tok
