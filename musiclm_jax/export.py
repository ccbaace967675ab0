"""`python -m musiclm_jax.export`: a serving bundle of a MusicLM (layout and format: musiclm_jax.serving).

    python -m musiclm_jax.export --gin_file=gin/sample/musiclm.gin --gin.MULAN_CHECKPOINT="'/ckpt/mulan'" ... \
        --output_dir /bundles/musiclm [--saved_model] [--platforms cpu,cuda,tpu]

gin/sample/musiclm.gin names the five run directories and the default generation settings (generate.load_musiclm);
the bundle holds what generation needs and nothing else:
  - parameters only (params/*.npz): the three stages, the codec's decoder and codebooks, MuLan's text tower and
    its conditioning RVQ (and the encoders below, each in its own part); no optimizer state, no training
    statistics. Which leaves a function reads is found by exporting it once at a fixed shape (jax.export keeps
    only the arguments the module uses);
  - exported/*.jaxexp: jax.export serializations, for a symbolic batch size `b` (and symbolic prompt length,
    cache capacity and codec frames), lowered for every platform in --platforms (default cpu, cuda, tpu):
    MuLan's text embedding and RVQ, the codec decoder, and each stage's prefill and decoding step, the functions
    stage_sampling.Stage samples with (stage_sampling.sample_window);
  - the caption vocabulary, the stages' token layouts, the resolved gin config, the generation settings and
    bundle.json (format version, every file's size and SHA-256);
  - the audio encoders that continuation and reranking need (export_encoders; --no_encoders leaves them out):
    the codec encoder, MuLan's audio tower and, when gin names a semantic tokenizer (SEMANTIC_TOKENIZER), its
    feature model's layer and k-means centres.
--saved_model also writes TF SavedModels (jax2tf, from the same exported functions) of every generation part
under saved_model/<part>/: signatures `embed_text` (mulan), `quantize` (mulan_rvq), `decode` (codec), `prefill` and
`step` (each stage); not of the encoders.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from musiclm_jax import gin_utils
from musiclm_jax.generation import pipeline
from musiclm_jax.serving import bundle as serving
from musiclm_jax.generation import stage_sampling

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
FLAGS = {"output_dir": None, "platforms": ",".join(DEFAULT_PLATFORMS)}
BOOLEAN_FLAGS = ("saved_model", "no_encoders")


@dataclasses.dataclass
class Function:
    """One exported function of the bundle: its Exported, the params part it takes first, the names of its other
    arguments and outputs (SavedModel signatures), and the symbolic-shape constraints it was exported with."""

    exported: Any
    part: str
    args: tuple[str, ...]
    outputs: tuple[str, ...]
    constraints: tuple[str, ...] = ()


def _spec(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _plain(tree):
    """Nested mappings (FrozenDict, orbax's dicts) as plain dicts of numpy arrays."""
    if hasattr(tree, "items"):
        return {str(k): _plain(v) for k, v in tree.items()}
    return np.asarray(jax.device_get(tree))


def used_params(fn, params: dict, *example_args) -> tuple[dict, Any]:
    """(the leaves of `params` that fn(params, *example_args) reads, fn taking only those). The other leaves are
    zeros inside the function (XLA drops them). Found by exporting fn once at the examples' fixed shapes, where
    jax.export keeps only the arguments the module uses."""
    from jax import export
    flat = traverse_util.flatten_dict(params)
    exported = export.export(jax.jit(fn))(_spec(params), *example_args)
    leaves_with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
    kept_leaves = {i for i in exported.module_kept_var_idx if i < len(leaves_with_paths)}
    kept_paths = {tuple(k.key for k in leaves_with_paths[i][0]) for i in kept_leaves}
    shapes = {path: (np.shape(x), x.dtype) for path, x in flat.items()}

    def pruned_fn(kept, *args):
        kept_flat = traverse_util.flatten_dict(kept)
        full = {path: kept_flat[path] if path in kept_flat else jnp.zeros(*shapes[path]) for path in flat}
        return fn(traverse_util.unflatten_dict(full), *args)
    return traverse_util.unflatten_dict({path: flat[path] for path in flat if path in kept_paths}), pruned_fn


# ------------------------------------------------------------------------------------------------ exporting
def export_mulan(mulan, platforms: Sequence[str]) -> tuple[dict[str, Function], dict[str, dict]]:
    """MuLan's caption embedding and conditioning RVQ: ({name: Function}, {part: params})."""
    from jax import export

    from musiclm_jax.vq import rvq_encode  # the function ConditioningRVQ.quantize jits
    if mulan.rvq is None or mulan.tokenizer is None:
        raise ValueError("MuLan needs its conditioning RVQ (mulan_rvq.npz) and caption vocabulary to be exported")
    length = mulan.model.text_length
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    params, embed_text = used_params(mulan.model.embed_text, _plain(mulan.params), tokens, tokens)
    rvq_params = {"codebooks": np.asarray(mulan.rvq.codebooks, np.float32)}
    b, = export.symbolic_shape("b")
    text = jax.ShapeDtypeStruct((b, length), jnp.int32)
    embed = export.export(jax.jit(embed_text), platforms=platforms)(_spec(params), text, text)
    quantize = export.export(jax.jit(lambda p, e: rvq_encode(e, p["codebooks"])), platforms=platforms)(
        _spec(rvq_params), jax.ShapeDtypeStruct((b, embed.out_avals[0].shape[1]), jnp.float32))
    return ({"mulan_embed_text": Function(embed, "mulan", ("tokens", "mask"), ("embeddings",)),
             "mulan_quantize": Function(quantize, "mulan_rvq", ("embeddings",), ("codes",))},
            {"mulan": params, "mulan_rvq": rvq_params})


def export_codec(codec, platforms: Sequence[str]) -> tuple[dict[str, Function], dict[str, dict]]:
    """The codec decoder for a symbolic batch and number of frames."""
    from jax import export
    decode = partial(codec.network.apply, method=type(codec.network).decode)
    levels = codec.num_quantizers
    params, decode = used_params(decode, _plain(codec.variables), jax.ShapeDtypeStruct((1, 4, levels), jnp.int32))
    b, f = export.symbolic_shape("b, f")
    exported = export.export(jax.jit(decode), platforms=platforms)(
        _spec(params), jax.ShapeDtypeStruct((b, f, levels), jnp.int32))
    return {"codec_decode": Function(exported, "codec", ("codes",), ("audio",))}, {"codec": params}


def export_encoders(musiclm: pipeline.MusicLM, platforms: Sequence[str]) -> tuple[dict[str, Function], dict[str, dict]]:
    """What continuation and reranking need (serving.ENCODER_FUNCTIONS): the codec encoder (all levels), MuLan's
    audio tower, and with a semantic tokenizer its features (the feature model's layer, pooled, with the
    pitch-class profile if it has one) and k-means assignment. The normalisation between them (mean, std) is
    stored as the 'semantic_normalization' part, applied in numpy as SemanticTokenizer does."""
    from jax import export
    functions, params = {}, {}
    codec, mulan = musiclm.codec, musiclm.mulan
    levels, hop = codec.num_quantizers, codec.hop_length
    network = codec.network

    def encode(variables, audio):
        return network.apply(variables, audio, levels, method=type(network).encode)
    used, encode = used_params(encode, _plain(codec.variables), jax.ShapeDtypeStruct((1, 4 * hop), jnp.float32))
    b, s = export.symbolic_shape("b, s")
    functions["codec_encode"] = Function(export.export(jax.jit(encode), platforms=platforms)(
        _spec(used), jax.ShapeDtypeStruct((b, s), jnp.float32)), "codec_encoder", ("audio",), ("codes",))
    params["codec_encoder"] = used
    window = mulan.window_samples
    used, embed = used_params(mulan.model.embed_audio, _plain(mulan.params),
                              jax.ShapeDtypeStruct((1, window), jnp.float32))
    b, = export.symbolic_shape("b")
    functions["mulan_embed_audio"] = Function(export.export(jax.jit(embed), platforms=platforms)(
        _spec(used), jax.ShapeDtypeStruct((b, window), jnp.float32)), "mulan_audio", ("audio",), ("embeddings",))
    params["mulan_audio"] = used
    tokenizer = musiclm.semantic_tokenizer
    if tokenizer is None:
        return functions, params
    features = tokenizer.features
    # FeatureExtractor.embed_fn: the layer features (pooled, with pitch classes) of (params, audio).
    # Audio of k >= 1 whole semantic frames (what continuation gives it): the feature model's framing decides
    # its shapes in Python, which a symbolic length of samples leaves inconclusive; a multiple of the frame does not.
    per_frame = tokenizer.sample_rate / tokenizer.frame_rate
    if abs(per_frame - round(per_frame)) > 1e-6:
        raise ValueError(f"the semantic tokenizer's frame ({tokenizer.sample_rate} Hz / {tokenizer.frame_rate} "
                         f"frames/s) is not a whole number of samples")
    constraints = ("k >= 1",)
    b, k = export.symbolic_shape("b, k", constraints=constraints)
    feature_params = _plain(features.params)
    functions["semantic_features"] = Function(export.export(jax.jit(features.embed_fn), platforms=platforms)(
        _spec(feature_params), jax.ShapeDtypeStruct((b, int(round(per_frame)) * k), jnp.float32)),
        "semantic_features", ("audio",), ("features",), constraints)
    params["semantic_features"] = feature_params
    from musiclm_jax.semantic.inference import nearest_centroids
    kmeans = {"centroids": np.asarray(tokenizer.centroids, np.float32)}
    b, t = export.symbolic_shape("b, t")
    functions["semantic_assign"] = Function(export.export(jax.jit(lambda p, x: nearest_centroids(x, p["centroids"])),
                                                          platforms=platforms)(
        _spec(kmeans), jax.ShapeDtypeStruct((b, t, kmeans["centroids"].shape[1]), jnp.float32)),
        "semantic_kmeans", ("features",), ("ids",))
    params["semantic_kmeans"] = kmeans
    params["semantic_normalization"] = {"mean": np.asarray(tokenizer.mean, np.float32),
                                        "std": np.asarray(tokenizer.std, np.float32)}
    return functions, params


def export_stage(stage: stage_sampling.Stage, platforms: Sequence[str]) -> tuple[dict[str, Function], dict[str, dict]]:
    """A stage's prefill (symbolic batch b, prompt length p, cache capacity c >= p) and step (b, c)."""
    from jax import export
    prefill, step = stage.decoder_functions()
    params = _plain(stage.params)
    b, p, c = export.symbolic_shape("b, p, c", constraints=("c >= p",))
    constraints = ("c >= p",)
    prefill_exported = export.export(jax.jit(prefill), platforms=platforms)(
        _spec(params), jax.ShapeDtypeStruct((b, p), jnp.int32), jax.ShapeDtypeStruct((b, p), jnp.bool_),
        jax.ShapeDtypeStruct((c,), jnp.int8))
    b, c = export.symbolic_shape("b, c")
    cache = jax.eval_shape(lambda: stage.model.init_cache(b, c))
    step_exported = export.export(jax.jit(step), platforms=platforms)(
        _spec(params), jax.ShapeDtypeStruct((b, 1), jnp.int32), cache)
    name = stage.name
    return ({f"{name}_prefill": Function(prefill_exported, name, ("tokens", "prefix_mask", "slots"),
                                         ("logits", "cache"), constraints),
             f"{name}_step": Function(step_exported, name, ("tokens", "cache"), ("logits", "cache"))},
            {name: params})


# ------------------------------------------------------------------------------------------------ SavedModel
def _names(prefix: str, tree) -> list[str]:
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [prefix + "".join(f"_{getattr(k, 'key', getattr(k, 'idx', k))}" for k in path) for path, _ in paths]


def write_saved_model(path: str, functions: dict[str, Function], params: dict, platforms: Sequence[str]) -> None:
    """A TF SavedModel (jax2tf, native serialization of the exported functions) whose signatures are the
    functions (named without the part prefix), taking their arguments by name (pytrees flattened to
    'cache.layers_0.attention.cached_key' ...) and holding `params` as variables."""
    import tensorflow as tf
    from jax.experimental import jax2tf
    leaves, _ = jax.tree.flatten(params)
    module = tf.Module()
    module.params = [tf.Variable(np.asarray(x), trainable=False) for x in leaves]
    signatures = {}
    for name, fn in functions.items():
        exported = fn.exported
        args_tree = jax.tree.unflatten(exported.in_tree, list(range(len(exported.in_avals))))[0][1:]
        names = [n for arg, tree in zip(fn.args, args_tree) for n in _names(arg, tree)]
        avals = exported.in_avals[len(leaves):]
        out_tree = jax.tree.unflatten(exported.out_tree, list(range(len(exported.out_avals))))
        out_tree = out_tree if len(fn.outputs) > 1 else (out_tree,)
        out_names = [n for out, tree in zip(fn.outputs, out_tree) for n in _names(out, tree)]

        def call(param_leaves, *flat_args, exported=exported):
            args, kwargs = jax.tree.unflatten(exported.in_tree, list(param_leaves) + list(flat_args))
            return exported.call(*args, **kwargs)
        converted = jax2tf.convert(call, polymorphic_shapes=[None] + [str(tuple(a.shape)).replace(",)", ")")
                                                                      for a in avals],
                                   polymorphic_constraints=fn.constraints, with_gradient=False,
                                   native_serialization_platforms=tuple(platforms))
        specs = [tf.TensorSpec([d if isinstance(d, int) else None for d in a.shape], tf.as_dtype(a.dtype), name=n)
                 for a, n in zip(avals, names)]

        def serve(*flat_args, converted=converted, out_names=out_names):
            return dict(zip(out_names, tf.nest.flatten(converted(list(module.params), *flat_args))))
        function = tf.function(serve, input_signature=specs, autograph=False)
        signatures[name.split("_", 1)[1]] = function.get_concrete_function()
    tf.saved_model.save(module, path, signatures=signatures)


# ------------------------------------------------------------------------------------------------ the bundle
def write_bundle(musiclm: pipeline.MusicLM, output_dir: str, platforms: Sequence[str] = DEFAULT_PLATFORMS,
                 gin_config: Optional[str] = None, saved_model: bool = False, encoders: bool = True,
                 log=sys.stderr) -> dict:
    """Writes the serving bundle of `musiclm` (its stages, codec and MuLan, and its current generation settings)
    to output_dir and returns its manifest (bundle.json). encoders: also the audio encoders continuation and
    reranking need (export_encoders; the semantic tokenizer's only if `musiclm` has one). The bundle is written
    next to output_dir and moved in place at the end; an existing output_dir must be an earlier bundle (replaced)
    or empty."""
    platforms = tuple(platforms)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and \
            not os.path.exists(os.path.join(output_dir, serving.MANIFEST)):
        raise FileExistsError(f"{output_dir} exists and is not a serving bundle: give an empty or new directory")
    start = time.time()
    functions, params = export_mulan(musiclm.mulan, platforms)
    for part_functions, part_params in [export_codec(musiclm.codec, platforms)] + [
            export_stage(musiclm.stages[name], platforms) for name in pipeline.STAGES]:
        functions.update(part_functions)
        params.update(part_params)
    if encoders:
        part_functions, part_params = export_encoders(musiclm, platforms)
        functions.update(part_functions)
        params.update(part_params)
    if log is not None:
        print(f"export: {len(functions)} functions exported for {', '.join(platforms)} "
              f"({time.time() - start:.1f} s)", file=log)
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".bundle-", dir=parent)
    try:
        def write(name: str, data) -> None:
            path = os.path.join(work, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb" if isinstance(data, (bytes, bytearray)) else "w") as f:
                f.write(data)
        for part, tree in params.items():
            os.makedirs(os.path.join(work, "params"), exist_ok=True)
            serving.save_tree(os.path.join(work, serving.params_file(part)), tree)
        for name, fn in functions.items():
            write(serving.function_file(name), fn.exported.serialize())
        tokenizer = f"{serving.TEXT_VOCAB_DIR}/{os.path.basename(musiclm.mulan.tokenizer.file)}"
        os.makedirs(os.path.join(work, serving.TEXT_VOCAB_DIR), exist_ok=True)
        shutil.copyfile(musiclm.mulan.tokenizer.file, os.path.join(work, tokenizer))
        write(serving.LAYOUTS_FILE, json.dumps({name: stage_sampling.StageSpec.of(musiclm.stages[name].model).to_json()
                                                for name in pipeline.STAGES}, indent=1))
        write(serving.GENERATION_FILE, json.dumps(dataclasses.asdict(musiclm.params), indent=1))
        if gin_config is not None:
            write(serving.CONFIG_FILE, gin_config)
        if saved_model:
            for part in serving.PARTS:
                write_saved_model(os.path.join(work, "saved_model", part),
                                  {n: f for n, f in functions.items() if f.part == part}, params[part], platforms)
        codec, mulan = musiclm.codec, musiclm.mulan
        manifest = {
            "format": serving.FORMAT, "format_version": serving.FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax_version": jax.__version__, "platforms": list(platforms),
            "sample_rate": int(codec.sample_rate), "semantic_rate": float(musiclm.semantic_rate),
            "melody_rate": float(getattr(musiclm, "melody_rate", 0.0)),  # 0: the semantic stage takes no melody
            "codec": {"hop_length": int(codec.hop_length), "num_quantizers": int(codec.num_quantizers),
                      "codebook_size": int(codec.codebook_size), "causal": bool(getattr(codec, "causal", False))},
            "mulan": {"tokenizer": tokenizer, "text_length": int(mulan.model.text_length),
                      "levels": int(mulan.rvq.levels), "codebook_size": int(mulan.rvq.codebook_size),
                      "sample_rate": int(mulan.sample_rate), "window_samples": int(mulan.window_samples),
                      "stride": int(mulan.stride), "batch_size": int(mulan.batch_size),
                      "short_clip_padding": str(mulan.model.short_clip_padding)},
            "functions": {name: {"file": serving.function_file(name), "params": serving.params_file(fn.part),
                                 "args": list(fn.args), "outputs": list(fn.outputs),
                                 "in_shapes": [str(a) for a in fn.exported.in_avals[
                                     len(jax.tree.leaves(params[fn.part])):]]}
                          for name, fn in functions.items()},
            "saved_model": sorted(os.listdir(os.path.join(work, "saved_model"))) if saved_model else [],
            "semantic_tokenizer": None if musiclm.semantic_tokenizer is None or not encoders else {
                "sample_rate": int(musiclm.semantic_tokenizer.sample_rate),
                "frame_rate": float(musiclm.semantic_tokenizer.frame_rate)},
        }
        files = {}
        for dirpath, _, names in os.walk(work):
            for n in names:
                path = os.path.join(dirpath, n)
                files[os.path.relpath(path, work)] = serving.file_entry(path)
        manifest["files"] = dict(sorted(files.items()))
        write(serving.MANIFEST, json.dumps(manifest, indent=1))
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(work, output_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if log is not None:
        total = sum(e["bytes"] for e in manifest["files"].values())
        print(f"export: wrote {output_dir} ({len(manifest['files'])} files, {total / 2 ** 20:.1f} MiB, "
              f"{time.time() - start:.1f} s)", file=log)
    return manifest


def main(argv: Optional[Sequence[str]] = None) -> dict:
    import gin
    argv = list(sys.argv[1:] if argv is None else argv)
    booleans = {name: False for name in BOOLEAN_FLAGS}
    rest = []
    for arg in argv:  # gin_utils' flags all take values: take the boolean ones out first
        name, _, value = arg[2:].partition("=")
        if arg.startswith("--") and name in booleans:
            if value.lower() not in ("", "true", "1", "false", "0"):
                raise gin_utils.FlagError(f"--{name}={value}: expected true or false")
            booleans[name] = value.lower() in ("", "true", "1")
        else:
            rest.append(arg)

    def go(flags):
        from musiclm_jax import generate
        if not flags["output_dir"]:
            raise gin_utils.FlagError("--output_dir is required")
        platforms = [p for p in flags["platforms"].split(",") if p]
        config = gin.config_str()
        musiclm = gin.get_configurable(generate.load_musiclm)()
        musiclm.log = None
        return write_bundle(musiclm, flags["output_dir"], platforms=platforms, gin_config=config,
                            saved_model=booleans["saved_model"], encoders=not booleans["no_encoders"])
    return gin_utils.run(go, extra_flags=FLAGS, argv=rest)


if __name__ == "__main__":
    from musiclm_jax import export as _export_module  # gin binds musiclm_jax.generate; keep one module object
    _export_module.main()
