"""`python -m musiclm_jax.convert <kind> --from SRC --to MODEL_DIR`: import open weights as a run directory.

Kinds:
  encodec   a transformers EncodecModel folder (config.json + weights) -> a codec run directory of
            gin/codec/encodec_24khz.gin with the converted generator (discriminators freshly initialised, so
            training from it fine-tunes) and config.gin describing the converted sizes.
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


def convert_encodec_dir(source: str, model_dir: str) -> str:
    """Converts the transformers EnCodec checkpoint folder `source` into run directory `model_dir`."""
    import gin
    import jax
    import numpy as np
    from transformers import EncodecModel

    from musiclm_jax import gin_utils, partitioning
    from musiclm_jax import train as train_lib
    from musiclm_jax.checkpoints import Checkpointer
    from musiclm_jax.convert.encodec import convert_encodec

    if not os.path.isdir(source):
        raise FileNotFoundError(f"--from {source!r} is not a directory with an EncodecModel (config.json + weights)")
    model = EncodecModel.from_pretrained(source).eval()
    params, state, seanet, rvq, sample_rate = convert_encodec(model)
    bindings = [f"MODEL_DIR = {model_dir!r}", f"SAMPLE_RATE = {sample_rate}"]
    bindings += _bindings("seanet.SEANetConfig", seanet) + _bindings("quantizers.RVQConfig", rvq)
    gin_utils.parse_gin(["gin/codec/encodec_24khz.gin"], bindings)
    args = gin_utils.bound_arguments("train", ["model", "optimizer"], {})
    codec_model, optimizer = args["model"], args["optimizer"]

    partitioner = partitioning.Partitioner(partitioning.create_mesh())
    setup = train_lib.make_train_setup(model=codec_model, optimizer=optimizer,
                                       batch_size=partitioner.data_parallel_size, partitioner=partitioner)
    fresh = setup.init_state(jax.random.key(0))
    converted = {"generator": params}
    expected = jax.tree.map(np.shape, fresh.params["generator"])
    got = jax.tree.map(np.shape, params)
    if expected != got:
        raise ValueError(f"converted EnCodec parameters do not match the codec built from its config:\n"
                         f"expected {expected}\ngot {got}")
    with partitioner.activate():
        generator_shardings = {"generator": setup.state_shardings.params["generator"]}
        new_params = dict(fresh.params, **jax.device_put(converted, generator_shardings))
        mutables = jax.device_put(state, setup.state_shardings.flax_mutables)
        converted_state = fresh.replace(params=new_params, flax_mutables=mutables)
    gin_utils.save_config(model_dir)
    gin.clear_config()
    checkpointer = Checkpointer(model_dir, async_save=False)
    checkpointer.save(converted_state, 0)
    checkpointer.close()
    return model_dir


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m musiclm_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["encodec"])
    parser.add_argument("--from", dest="source", required=True, help="checkpoint folder to import")
    parser.add_argument("--to", dest="model_dir", required=True, help="run directory to write")
    args = parser.parse_args(argv)
    if args.kind == "encodec":
        convert_encodec_dir(args.source, args.model_dir)
    print(f"convert: {args.kind} {args.source} -> {args.model_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
