"""`python -m musiclm_jax.convert <kind> --from SRC --to MODEL_DIR`: import open weights as a run directory.

Kinds:
  encodec   a transformers EncodecModel folder (config.json + weights) -> a codec run directory of
            gin/codec/encodec_24khz.gin with the converted generator (discriminators freshly initialised, so
            training from it fine-tunes) and config.gin describing the converted sizes.
  hubert    a transformers HubertModel folder (HuBERT, or MERT: config.json + weights, optionally
            preprocessor_config.json giving the sampling rate) -> a run directory of gin/semantic/hubert.gin: the
            frozen feature model (hubert_model.HubertFeatureModel) with config.gin describing the converted sizes.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # conversion never downloads


def _bindings(prefix: str, config) -> list[str]:
    return [f"{prefix}.{f.name} = {getattr(config, f.name)!r}" for f in dataclasses.fields(config)]


def _write_converted_run(model_dir: str, gin_file: str, bindings: list[str], params: dict, what: str,
                         subtree: Optional[str] = None, flax_mutables: Optional[dict] = None) -> str:
    """Writes run directory `model_dir`: `gin_file`'s model built with `bindings` (the converted sizes), its freshly
    initialised train state with `params` put in (at params[subtree] if given; shapes checked) and, if given, the
    converted `flax_mutables`; then config.gin and a step-0 checkpoint."""
    import gin
    import jax
    import numpy as np

    from musiclm_jax import gin_utils, partitioning
    from musiclm_jax import train as train_lib
    from musiclm_jax.checkpoints import Checkpointer

    gin_utils.parse_gin([gin_file], [f"MODEL_DIR = {model_dir!r}"] + bindings)
    try:
        args = gin_utils.bound_arguments("train", ["model", "optimizer"], {})
        partitioner = partitioning.Partitioner(partitioning.create_mesh())
        setup = train_lib.make_train_setup(model=args["model"], optimizer=args["optimizer"],
                                           batch_size=partitioner.data_parallel_size, partitioner=partitioner)
        fresh = setup.init_state(jax.random.key(0))
        target = fresh.params if subtree is None else fresh.params[subtree]
        expected, got = jax.tree.map(np.shape, target), jax.tree.map(np.shape, params)
        if expected != got:
            raise ValueError(f"converted {what} parameters do not match the model built from its config:\n"
                             f"expected {expected}\ngot {got}")
        shardings = setup.state_shardings.params
        with partitioner.activate():
            if subtree is None:
                new_params = jax.device_put(params, shardings)
            else:
                new_params = dict(fresh.params, **{subtree: jax.device_put(params, shardings[subtree])})
            state = fresh.replace(params=new_params)
            if flax_mutables is not None:
                state = state.replace(flax_mutables=jax.device_put(flax_mutables,
                                                                   setup.state_shardings.flax_mutables))
        gin_utils.save_config(model_dir)
    finally:
        gin.clear_config()
    checkpointer = Checkpointer(model_dir, async_save=False)
    checkpointer.save(state, 0)
    checkpointer.close()
    return model_dir


def convert_encodec_dir(source: str, model_dir: str) -> str:
    """Converts the transformers EnCodec checkpoint folder `source` into run directory `model_dir`."""
    from transformers import EncodecModel

    from musiclm_jax.convert.encodec import convert_encodec

    if not os.path.isdir(source):
        raise FileNotFoundError(f"--from {source!r} is not a directory with an EncodecModel (config.json + weights)")
    model = EncodecModel.from_pretrained(source).eval()
    params, state, seanet, rvq, sample_rate = convert_encodec(model)
    bindings = [f"SAMPLE_RATE = {sample_rate}"]
    bindings += _bindings("seanet.SEANetConfig", seanet) + _bindings("quantizers.RVQConfig", rvq)
    return _write_converted_run(model_dir, "gin/codec/encodec_24khz.gin", bindings, params, "EnCodec",
                                subtree="generator", flax_mutables=state)


def _sampling_rate(source: str) -> Optional[int]:
    """The feature extractor's sampling_rate (preprocessor_config.json), if the folder has one."""
    import json

    path = os.path.join(source, "preprocessor_config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rate = json.load(f).get("sampling_rate")
    return int(rate) if rate else None


def convert_hubert_dir(source: str, model_dir: str) -> str:
    """Converts the transformers HuBERT/MERT checkpoint folder `source` into run directory `model_dir`."""
    from transformers import HubertConfig as HFHubertConfig
    from transformers import HubertModel

    from musiclm_jax.convert.hubert import config_from_hf, convert_hubert

    if not os.path.isdir(source):
        raise FileNotFoundError(f"--from {source!r} is not a directory with a HubertModel (config.json + weights)")
    hf_config = HFHubertConfig.from_pretrained(source)  # a MERT config.json reads as one too (its extra keys kept)
    config = config_from_hf(hf_config, _sampling_rate(source))  # refuses unsupported settings before loading
    model = HubertModel.from_pretrained(source, config=hf_config).eval()
    params, config = convert_hubert(model, config.sample_rate)
    bindings = [f"SAMPLE_RATE = {config.sample_rate}", f"SEGMENT_SAMPLES = {10 * config.sample_rate}"]
    bindings += _bindings("hubert.HubertConfig", config)
    return _write_converted_run(model_dir, "gin/semantic/hubert.gin", bindings, params, "HuBERT")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m musiclm_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["encodec", "hubert"])
    parser.add_argument("--from", dest="source", required=True, help="checkpoint folder to import")
    parser.add_argument("--to", dest="model_dir", required=True, help="run directory to write")
    args = parser.parse_args(argv)
    if args.kind == "encodec":
        convert_encodec_dir(args.source, args.model_dir)
    elif args.kind == "hubert":
        convert_hubert_dir(args.source, args.model_dir)
    print(f"convert: {args.kind} {args.source} -> {args.model_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
