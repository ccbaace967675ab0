"""The MusicLM paper's memorization study of the semantic stage, on a token cache of its training data.

For up to `max_examples` chunks of a split, the stage is given the chunk's MuLan tokens (or its caption's text
tokens when the cache has none), no melody, and the first `prompt_seconds` of its semantic tokens, and samples
the next `continuation_seconds`; the continuations are compared with the chunk's own tokens
(generation_metrics.memorization: exact and approximate matches, mean token agreement).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from musiclm_jax.data import token_cache
from musiclm_jax.evaluation import generation_metrics


def read_training_tokens(token_dir: str, split: str, min_frames: int, max_examples: int,
                         needed_by: str = "the memorization metric") -> dict:
    """{'semantic' [N, F] int, 'mulan' [N, levels] int or None (if the cache has no MuLan tokens), 'text' [N],
    'ids' [N], 'spec' and 'mulan_spec': the manifest entries of the semantic and MuLan tokenizers} of the first
    `max_examples` chunks of `split` whose real (unpadded) audio covers at least `min_frames` semantic frames."""
    manifest = token_cache.read_manifest(token_dir)
    spec = token_cache.tokenizer_spec(manifest, "semantic", token_dir, needed_by)
    has_mulan = "mulan" in manifest.get("tokenizers", {})
    if split not in manifest.get("splits", {}):
        raise ValueError(f"token cache {token_dir} has no split {split!r} (it has {sorted(manifest['splits'])})")
    paths = token_cache.completed_shards(token_dir, split, manifest["splits"][split]["num_shards"])
    if not paths:
        raise ValueError(f"token cache {token_dir} has no finished shards in split {split!r}")
    import tensorflow as tf  # the cache is TFRecord; read only when a TOKEN_DIR is given
    out = {"semantic": [], "mulan": [], "text": [], "ids": []}
    for raw in tf.data.TFRecordDataset(paths).as_numpy_iterator():
        if len(out["ids"]) >= max_examples:
            break
        feature = tf.train.Example.FromString(raw).features.feature
        semantic = np.asarray(feature["semantic"].int64_list.value, np.int64).reshape(spec["frames"], -1)[:, 0]
        real = int(feature["num_samples"].int64_list.value[0]) * spec["frame_rate"] / manifest["sample_rate"]
        if int(real + 1e-6) < min_frames:
            continue
        out["semantic"].append(semantic)
        out["ids"].append(feature["id"].bytes_list.value[0].decode())
        out["text"].append(feature["text"].bytes_list.value[0].decode())
        if has_mulan:
            out["mulan"].append(np.asarray(feature["mulan"].int64_list.value, np.int64))
    if not out["ids"]:
        raise ValueError(f"token cache {token_dir} split {split!r} has no chunk with {min_frames} real semantic "
                         f"frames ({min_frames / spec['frame_rate']:.2f} s)")
    return {"semantic": np.stack(out["semantic"]), "mulan": np.stack(out["mulan"]) if has_mulan else None,
            "text": out["text"], "ids": out["ids"], "spec": spec,
            "mulan_spec": manifest["tokenizers"].get("mulan")}


def semantic_continuations(musiclm, mulan_tokens: np.ndarray, prompts: np.ndarray, steps: int,
                           temperature: Optional[float] = None, seed: int = 0, batch_size: int = 16) -> np.ndarray:
    """The semantic stage's continuations [N, steps] (local token ids) of prompts [N, P] (local ids) under MuLan
    conditioning tokens [N, levels], in one window (P + steps <= the stage's window), without melody (PAD).
    Example i draws from fold_in(key(seed), i); batches are padded to `batch_size` rows (one compiled shape).
    temperature: default the generation's semantic temperature."""
    import jax
    stage = musiclm.stages["semantic"]
    model = stage.model
    prompts, mulan_tokens = np.asarray(prompts), np.asarray(mulan_tokens)
    n, p = prompts.shape
    if p + steps > model.target_length:
        raise ValueError(f"memorization prompt ({p}) + continuation ({steps}) frames exceed the semantic stage's "
                         f"window of {model.target_length} frames")
    temperature = musiclm.params.temperature[0] if temperature is None else float(temperature)
    base = jax.random.key(seed)
    out = []
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(n, start + batch_size))
        rows = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
        parts = [model.layout.to_global(mulan_tokens[rows], "mulan")]
        if musiclm.melody_length:
            parts.append(np.zeros((batch_size, musiclm.melody_length), np.int32))  # PAD: no melody
        parts.append(model.layout.to_global(prompts[rows], "semantic"))
        prefix = np.concatenate(parts, axis=1).astype(np.int32)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(np.arange(start, start + batch_size))
        new = stage.sample(prefix, steps, p, keys, musiclm.params, temperature)
        out.append(model.layout.to_local(new, "semantic")[:min(n, start + batch_size) - start])
    return np.concatenate(out).astype(np.int64)


def memorization_from_cache(musiclm, token_dir: str, prompt_seconds: float = 10.0,
                            continuation_seconds: float = 5.0, max_examples: int = 256, split: str = "train",
                            temperature: Optional[float] = None, approximate_threshold: float = 0.1,
                            seed: int = 0, batch_size: int = 16) -> dict:
    """The memorization metrics (generation_eval's docstring) of musiclm's semantic stage on the token cache
    `token_dir`."""
    rate = musiclm.semantic_rate
    prompt, steps = int(round(prompt_seconds * rate)), int(round(continuation_seconds * rate))
    if prompt < 0 or steps < 1:
        raise ValueError(f"memorization needs prompt_seconds >= 0 and continuation_seconds >= {1 / rate} s; got "
                         f"{prompt_seconds} and {continuation_seconds}")
    window = musiclm.stages["semantic"].model.target_length
    if prompt + steps > window:
        raise ValueError(f"memorization prompt ({prompt}) + continuation ({steps}) frames exceed the semantic stage's "
                         f"window of {window} frames")
    data = read_training_tokens(token_dir, split, prompt + steps, max_examples)
    layout = musiclm.stages["semantic"].model.layout
    spec = data["spec"]
    vocab = layout.group("semantic").codebook_size
    if spec["codebook_size"] != vocab or abs(spec["frame_rate"] - rate) > 1e-6:
        raise ValueError(f"token cache {token_dir} has semantic tokens of {spec['codebook_size']} codes at "
                         f"{spec['frame_rate']} Hz; the semantic stage uses {vocab} codes at {rate} Hz")
    if data["mulan"] is not None:
        mulan_tokens = data["mulan"]
        group = layout.group("mulan")
        if mulan_tokens.shape[1] != group.levels or data["mulan_spec"]["codebook_size"] != group.codebook_size:
            raise ValueError(f"token cache {token_dir} has MuLan tokens of {mulan_tokens.shape[1]} x "
                             f"{data['mulan_spec']['codebook_size']}; the semantic stage uses {group.levels} x "
                             f"{group.codebook_size}")
    else:
        if not all(data["text"]):
            raise ValueError(f"token cache {token_dir} has neither MuLan tokens nor captions for every chunk, so "
                             f"the semantic stage has no conditioning for memorization")
        mulan_tokens = musiclm.mulan.tokens_from_text(data["text"])
    semantic = data["semantic"]
    generated = semantic_continuations(musiclm, mulan_tokens, semantic[:, :prompt], steps, temperature, seed,
                                       batch_size)
    result = generation_metrics.memorization(semantic[:, prompt:prompt + steps], generated, approximate_threshold)
    metrics = {f"memorization_{k}": v for k, v in result.items()}
    metrics.update(memorization_chance_agreement=1.0 / vocab, memorization_num_examples=len(semantic),
                   memorization_prompt_seconds=prompt / rate, memorization_continuation_seconds=steps / rate)
    return metrics

