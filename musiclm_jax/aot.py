"""Ahead-of-time compile of a run's real train step for a TPU topology, on this (CPU) machine.

    python -m musiclm_jax.aot --gin_file=gin/stages/semantic_paper.gin --topology=v5e:4x4 [--gin.BATCH_SIZE=...]
    python -m musiclm_jax.aot --job=tokenize --gin_file=gin/tokenize/aot_paper.gin --topology=v5e:16x16
    python -m musiclm_jax.aot --job=token_manifest --gin_file=gin/tokenize/aot_paper.gin --output_dir=DIR

Uses the same gin files as training (the `train` bindings: model, optimizer, batch size, mesh, rules,
microbatches), builds the mesh from the topology's abstract devices (libtpu, from the `tpu` extra), lowers and
compiles the train step with its shardings, and prints one JSON line:

  topology, device_kind, num_chips, num_devices, mesh, batch_size, params,
  per_chip_bytes        arguments + outputs + temporaries - donated aliases, from the executable's
                        memory_analysis(), summed over the devices of one chip
  hbm_bytes_per_chip, fits, headroom (1 - per_chip_bytes / hbm_bytes_per_chip),
  model_flops_per_chip  analytic: 6 * matmul params * tokens + attention, over the chips
  min_step_seconds      model_flops_per_chip / the chip's peak bf16 FLOP/s: a compute-bound lower bound
                        (libtpu's cost_analysis() counts a scanned layer once, so it is not used)
  largest_replicated_param_bytes / _name   MaxText's check that parameters are sharded enough
  compile_seconds

`--job=tokenize` compiles the tokenization job's device work instead (tokenize_forward.TokenizationForward, set
up by gin's tokenize_forward.aot_setup: the tokenizers' model gin files, chunk length, global batch) on a batch
laid over the data axes, and reports per-chip memory as above, matmul_flops_per_chunk by tokenizer (counted from
the jaxpr, musiclm_jax.flops), min_batch_seconds (those FLOPs at the chips' peak), audio_seconds_per_second_floor
and dataset_floor_hours (the hours of compute-bound work for `dataset_hours` of audio).

`--job=token_manifest --output_dir=DIR` writes DIR/manifest.json, the manifest the tokenization job would write
with those tokenizers (each one's rate, levels, codebook size and frames per chunk, from the models' gin files by
shape evaluation: no checkpoint, no data, no topology), marked planned and without splits. A stage reads its token
layout and lengths from it (data/stages.py): the AOT compile of a stage before any tokenization, the recipe's pod
plan, benchmarks and tests of random-init stages. `--gin.TOKEN_DIR=DIR` then compiles a stage's gin file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from musiclm_jax import gin_utils, partitioning

# Per chip: HBM bytes and peak dense bf16 FLOP/s (public TPU specifications), by jax device_kind.
TPU_CHIPS = {
    "TPU v4": {"hbm_bytes": 32 * 2**30, "peak_bf16_flops": 275e12},
    "TPU v5 lite": {"hbm_bytes": 16 * 2**30, "peak_bf16_flops": 197e12},
    "TPU v5": {"hbm_bytes": 95 * 2**30, "peak_bf16_flops": 459e12},
    "TPU v6 lite": {"hbm_bytes": 32 * 2**30, "peak_bf16_flops": 918e12},
}

TRAIN_ARGUMENTS = ("model", "optimizer", "train_dataset_cfg", "mesh_config", "logical_axis_rules",
                   "num_microbatches")


def topology_devices(topology: str) -> list:
    """Abstract devices of a TPU topology such as 'v5e:4x4' or 'v4:2x2x1' (needs libtpu).

    Describing a topology opens no chip, so libtpu's one-process-per-host lockfile (/tmp/libtpu_lockfile) is
    waived for it: two compile jobs at once (parallel tests, `recipe --aot` beside a `python -m
    musiclm_jax.aot`) would otherwise fail with "Internal error when accessing libtpu multi-process lockfile".
    A value the caller has set for ALLOW_MULTIPLE_LIBTPU_LOAD is kept.
    """
    from jax.experimental import topologies
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # libtpu missing or unknown name
        raise ValueError(f"--topology={topology!r}: libtpu could not describe it ({e}). Install the `tpu` extra "
                         f"(pip install -e '.[tpu]') and use a name like v5e:4x4, v4:2x2x1, v5p:2x2x1, v6e:4x4") from e


def _chip_memory(compiled, devices_per_chip: int, chip: dict) -> dict[str, Any]:
    """The report's memory entries for a compiled executable: per_chip_bytes (arguments + outputs + temporaries
    + generated code - donated aliases, from memory_analysis() per device, times the devices of one chip), its
    breakdown, and the chip's HBM, fits and headroom."""
    mem = compiled.memory_analysis()
    per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                  - mem.alias_size_in_bytes + mem.generated_code_size_in_bytes)
    per_chip = int(per_device * devices_per_chip)
    return {
        "per_chip_bytes": per_chip,
        "per_chip_breakdown": {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
                               "temporaries": int(mem.temp_size_in_bytes), "aliased": int(mem.alias_size_in_bytes)},
        "hbm_bytes_per_chip": chip["hbm_bytes"],
        "fits": per_chip <= chip["hbm_bytes"],
        "headroom": 1.0 - per_chip / chip["hbm_bytes"],
    }


def compile_for_topology(*, model, optimizer, batch_size: int, mesh_config: partitioning.MeshConfig,
                         logical_axis_rules: Optional[Sequence] = None, num_microbatches: int = 1,
                         topology: str) -> dict[str, Any]:
    """Compiles the train step for `topology` and returns the report (see module docstring)."""
    from musiclm_jax.train import make_train_setup

    devices, kind, chips = _chip_layout(topology)
    devices_per_chip = len(devices) // chips
    mesh = partitioning.create_mesh(mesh_config, devices)
    partitioner = partitioning.Partitioner(mesh, logical_axis_rules)
    setup = make_train_setup(model=model, optimizer=optimizer, batch_size=batch_size, partitioner=partitioner,
                             num_microbatches=num_microbatches)
    dtypes = model.input_dtypes()
    batch = {k: jax.ShapeDtypeStruct(shape, dtypes[k], sharding=setup.batch_shardings[k])
             for k, shape in model.input_shapes(batch_size).items()}
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=partitioner.replicated())

    start = time.perf_counter()
    with partitioner.activate():
        compiled = setup.train_step.lower(setup.abstract_state, batch, rng).compile()
    compile_seconds = time.perf_counter() - start

    chip = TPU_CHIPS[kind]
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state.params))
    largest_bytes, largest_name = partitioner.largest_replicated_param_bytes(
        setup.abstract_state.params, setup.state_shardings.params)
    try:
        flops_per_chip = model.train_flops_per_example() * batch_size / chips
    except NotImplementedError:  # models without an analytic FLOP count (convolutional codecs)
        flops_per_chip = None
    return {
        "topology": topology,
        "device_kind": kind,
        "num_chips": chips,
        "num_devices": len(devices),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "batch_size": batch_size,
        "num_microbatches": num_microbatches,
        "params": params,
        **_chip_memory(compiled, devices_per_chip, chip),
        "model_flops_per_chip": flops_per_chip,
        "min_step_seconds": None if flops_per_chip is None else flops_per_chip / chip["peak_bf16_flops"],
        "largest_replicated_param_bytes": largest_bytes,
        "largest_replicated_param_name": largest_name,
        "compile_seconds": round(compile_seconds, 2),
    }


def _chip_layout(topology: str):
    devices = topology_devices(topology)
    kind = devices[0].device_kind
    if kind not in TPU_CHIPS:
        raise ValueError(f"no chip specification for device kind {kind!r}; known: {sorted(TPU_CHIPS)}")
    chips = len({tuple(d.coords) for d in devices})
    return devices, kind, chips


def tokenization_forward_and_variables(setup: dict[str, Any], partitioner: partitioning.Partitioner):
    """(TokenizationForward, abstract variables with their shardings on the partitioner's mesh, parameter counts
    {tokenizer: n}) of a tokenize_forward.aot_setup. Parameters are laid out by each model's logical axis rules; the
    k-means centres, normalisation and RVQ codebooks are replicated."""
    from musiclm_jax import checkpoint_loading, tokenize_forward
    from musiclm_jax.semantic import inference as semantic
    from musiclm_jax.mulan import inference as mulan_lib

    def abstract(model):
        return checkpoint_loading.abstract_variables(model, partitioner)

    def replicated(shape):
        return jax.ShapeDtypeStruct(shape, jax.numpy.float32, sharding=partitioner.replicated())

    def count(tree):
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))

    codec_model = tokenize_forward.model_from_gin(setup["codec_gin"])
    codec_abstract = abstract(codec_model)
    variables = {"codec": codec_model.variables(codec_abstract["params"], codec_abstract)}
    params = {"codec": count(variables["codec"]["params"])}  # encoder and decoder (the network's variables)
    features = mulan_model = None
    stride = 1  # MuLan's window hop in samples (unused without MuLan)
    if setup["semantic_gin"]:
        if not setup["semantic_fit_gin"]:
            raise ValueError("tokenize_forward.aot_setup: semantic_gin needs semantic_fit_gin (its layer and clusters)")
        fit = tokenize_forward.semantic_fit_settings(setup["semantic_fit_gin"])
        feature_model = tokenize_forward.model_from_gin(setup["semantic_gin"])
        feature_params = abstract(feature_model)["params"]
        features = semantic.FeatureExtractor(feature_model, None, fit["layer"], fit["frame_pooling"],
                                             pitch_classes=fit["pitch_class_share"] > 0)
        dim = tokenize_forward.feature_dim(features, feature_params)
        variables["semantic"] = {"params": feature_params, "mean": replicated((dim,)), "std": replicated((dim,)),
                                 "centroids": replicated((fit["num_clusters"], dim))}
        params["semantic"] = count(feature_params)
    if setup["mulan_gin"]:
        mulan_model = tokenize_forward.model_from_gin(setup["mulan_gin"])
        mulan_params = tokenize_forward.mulan_audio_params(abstract(mulan_model)["params"])
        stride = int(round(mulan_lib.STRIDE_SECONDS * mulan_model.sample_rate))
        variables["mulan"] = {"params": mulan_params, "codebooks": replicated(
            (setup["mulan_rvq_levels"], setup["mulan_rvq_codebook_size"], mulan_model.network.embed_dim))}
        params["mulan_audio_tower"] = count(mulan_params)
    forward = tokenize_forward.TokenizationForward(codec_model.generator, codec_model.sample_rate, features,
                                                   mulan_model, stride)
    return forward, variables, params


def planned_token_manifest(setup: dict[str, Any]) -> dict[str, Any]:
    """The manifest.json (data/token_cache.py) that `python -m musiclm_jax.tokenize` would write with the
    tokenizers of `setup` (a tokenize_forward.aot_setup), without their checkpoints or any data: 'tokenizers' with
    each one's sample_rate and frame_rate (Hz), levels, codebook_size and frames per chunk (the codec's and the
    semantic tokenizer's by shape evaluation of the job's forward on one chunk, as the job probes a silent one),
    'planned': true and no splits. Training on it fails naming it (tasks/tokenized.register_stage_task)."""
    from musiclm_jax.generation import melody
    partitioner = partitioning.Partitioner(partitioning.create_mesh(partitioning.MeshConfig(), jax.devices()[:1]))
    forward, variables, _ = tokenization_forward_and_variables(setup, partitioner)
    chunk_seconds = float(setup["chunk_seconds"])
    shapes = forward.input_shapes(1, chunk_seconds)
    frames_of = dataclasses.replace(forward, mulan_model=None)  # MuLan gives one frame per chunk
    audio = {rate: jax.ShapeDtypeStruct(shapes[rate], jax.numpy.float32) for rate in frames_of.sample_rates}
    with partitioner.activate():
        out = jax.eval_shape(frames_of, variables, audio)

    def spec(sample_rate, frame_rate, levels, codebook_size, frames):
        return {"sample_rate": int(sample_rate), "frame_rate": float(frame_rate), "levels": int(levels),
                "codebook_size": int(codebook_size), "frames": int(frames), "checkpoint": None}
    codec_rate, rvq = forward.codec_rate, forward.codec_network.rvq
    tokenizers = {"codec": spec(codec_rate, codec_rate / forward.codec_network.hop_length, rvq.num_quantizers,
                                rvq.codebook_size, out["codec"].shape[1])}
    if forward.features is not None:
        tokenizers["semantic"] = spec(forward.features.sample_rate, forward.features.frame_rate, 1,
                                      variables["semantic"]["centroids"].shape[0], out["semantic"].shape[1])
    if forward.mulan_model is not None:
        levels, codes, _ = variables["mulan"]["codebooks"].shape
        tokenizers["mulan"] = spec(forward.mulan_model.sample_rate, 1.0 / chunk_seconds, levels, codes, 1)
    if setup.get("melody_rate"):
        rate = float(setup["melody_rate"])
        tokenizers["melody"] = spec(codec_rate, rate, 1, melody.VOCAB_SIZE,
                                    melody.num_frames(int(round(chunk_seconds * codec_rate)), codec_rate, rate))
    return {"source": None, "sample_rate": int(codec_rate), "chunk_seconds": chunk_seconds,
            "tokenizers": tokenizers, "splits": {}, "planned": True, "complete": False}


def write_planned_token_cache(setup: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """planned_token_manifest(setup) written to output_dir/manifest.json; returns it."""
    from musiclm_jax.data import token_cache
    manifest = planned_token_manifest(setup)
    os.makedirs(output_dir, exist_ok=True)
    token_cache.write_manifest(output_dir, manifest)
    return manifest


def tokenizers_setup(tokenizers_gin: str) -> dict[str, Any]:
    """The tokenize_forward.aot_setup that the gin file `tokenizers_gin` binds (gin/tokenize/aot_*.gin: the
    tokenizers' model gin files, MuLan's RVQ size, the chunk length, the melody rate), read in a private gin
    configuration."""
    import gin

    from musiclm_jax import tokenize_forward
    with gin_utils.private_config():
        gin_utils.parse_gin([tokenizers_gin], [], finalize=False)
        return gin.get_configurable(tokenize_forward.aot_setup)()


# The tokenizers of each size as the recipe trains them (tokenize_forward.aot_setup gin files).
TOKENIZERS_GIN = {"tiny": "gin/tokenize/aot_tiny.gin", "paper": "gin/tokenize/aot_paper.gin"}
_PLANNED_DIRS: dict[str, str] = {}


def planned_token_dir(size: str) -> str:
    """A planned token cache of the `size` ('tiny' or 'paper') tokenizers (TOKENIZERS_GIN), written once per
    process in a temporary directory: the TOKEN_DIR from which a stage's gin file takes its layout and lengths
    where no cache is tokenized (random-init stages in benchmarks and tests)."""
    if size not in TOKENIZERS_GIN:
        raise ValueError(f"planned_token_dir: size {size!r}: one of {sorted(TOKENIZERS_GIN)}")
    if size not in _PLANNED_DIRS:
        import tempfile
        directory = tempfile.mkdtemp(prefix=f"planned_tokens_{size}_")
        write_planned_token_cache(tokenizers_setup(TOKENIZERS_GIN[size]), directory)
        _PLANNED_DIRS[size] = directory
    return _PLANNED_DIRS[size]


def compile_tokenization_for_topology(*, setup: dict[str, Any], topology: str) -> dict[str, Any]:
    """Compiles the tokenization job's device work (tokenize_forward.TokenizationForward) on a global batch of
    chunks laid over the data axes of `topology`, and returns its report (see the module docstring)."""
    from musiclm_jax import flops as flops_lib

    devices, kind, chips = _chip_layout(topology)
    mesh = partitioning.create_mesh(setup["mesh_config"], devices)
    partitioner = partitioning.Partitioner(mesh, setup["logical_axis_rules"])
    batch_size, chunk_seconds = int(setup["batch_size"]), float(setup["chunk_seconds"])
    partitioner.check_global_batch(batch_size, "tokenize_forward.aot_setup.batch_size")
    forward, variables, params = tokenization_forward_and_variables(setup, partitioner)
    audio = {rate: jax.ShapeDtypeStruct(shape, jax.numpy.float32, sharding=partitioner.batch_sharding(2))
             for rate, shape in forward.input_shapes(batch_size, chunk_seconds).items()}
    with partitioner.activate():
        flops_by = {"total": flops_lib.matmul_flops(forward, variables, audio)}
        if forward.features is not None or forward.mulan_model is not None:
            codec_only = dataclasses.replace(forward, features=None, mulan_model=None)
            flops_by["codec"] = flops_lib.matmul_flops(codec_only, variables, audio)
        if forward.features is not None:
            flops_by["semantic"] = flops_lib.matmul_flops(
                dataclasses.replace(forward, mulan_model=None), variables, audio) - flops_by["codec"]
        if forward.mulan_model is not None:
            flops_by["mulan"] = flops_lib.matmul_flops(
                dataclasses.replace(forward, features=None), variables, audio) - flops_by["codec"]
        start = time.perf_counter()
        compiled = jax.jit(forward).lower(variables, audio).compile()
    compile_seconds = time.perf_counter() - start
    chip = TPU_CHIPS[kind]
    min_batch_seconds = flops_by["total"] / chips / chip["peak_bf16_flops"]
    audio_seconds_per_second = batch_size * chunk_seconds / min_batch_seconds
    return {
        "job": "tokenize",
        "topology": topology,
        "device_kind": kind,
        "num_chips": chips,
        "num_devices": len(devices),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "batch_size": batch_size,
        "chunk_seconds": chunk_seconds,
        "inputs": {f"{rate}Hz": list(a.shape) for rate, a in audio.items()},
        "params": params,
        **_chip_memory(compiled, len(devices) // chips, chip),
        "matmul_flops_per_chunk": {k: v / batch_size for k, v in flops_by.items()},
        "min_batch_seconds": min_batch_seconds,
        "audio_seconds_per_second_floor": audio_seconds_per_second,
        "dataset_hours": setup["dataset_hours"],
        "dataset_floor_hours": setup["dataset_hours"] * 3600.0 / audio_seconds_per_second / 3600.0,
        "compile_seconds": round(compile_seconds, 2),
    }


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Entry point; prints the report as one JSON line and returns it."""
    def run(flags):
        if flags["job"] not in ("train", "tokenize", "token_manifest"):
            raise gin_utils.FlagError(f"--job={flags['job']!r}: 'train' (a run's train step), 'tokenize' (the "
                                      f"tokenization job's forward, tokenize_forward.aot_setup) or "
                                      f"'token_manifest' (the token cache those tokenizers would write, planned)")
        if flags["job"] == "token_manifest":
            import gin

            from musiclm_jax import tokenize_forward
            if not flags["output_dir"]:
                raise gin_utils.FlagError("--job=token_manifest needs --output_dir=DIR (where manifest.json goes)")
            manifest = write_planned_token_cache(gin.get_configurable(tokenize_forward.aot_setup)(),
                                                 flags["output_dir"])
            print(json.dumps(manifest["tokenizers"]), flush=True)
            return manifest
        if not flags["topology"]:
            raise gin_utils.FlagError("--topology is required, e.g. --topology=v5e:4x4")
        if flags["job"] == "tokenize":
            import gin

            from musiclm_jax import tokenize_forward
            report = compile_tokenization_for_topology(setup=gin.get_configurable(tokenize_forward.aot_setup)(),
                                                       topology=flags["topology"])
            print(json.dumps(report), flush=True)
            return report
        defaults = {"mesh_config": partitioning.MeshConfig(), "logical_axis_rules": None, "num_microbatches": 1}
        args = gin_utils.bound_arguments("train", TRAIN_ARGUMENTS, defaults)
        report = compile_for_topology(
            model=args["model"], optimizer=args["optimizer"], batch_size=args["train_dataset_cfg"].batch_size,
            mesh_config=args["mesh_config"], logical_axis_rules=args["logical_axis_rules"],
            num_microbatches=args["num_microbatches"], topology=flags["topology"])
        print(json.dumps(report), flush=True)
        return report

    return gin_utils.run(run, extra_flags={"topology": None, "job": "train", "output_dir": None}, argv=argv,
                         finalize=False)


if __name__ == "__main__":
    main(sys.argv[1:])
