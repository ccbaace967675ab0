"""`python -m musiclm_jax.convert <kind> --from SRC --to MODEL_DIR`: import open weights as a run directory.

Kinds:
  encodec   a transformers EncodecModel folder (config.json + weights) -> a codec run directory of
            gin/codec/encodec_24khz.gin with the converted generator (discriminators freshly initialised, so
            training from it fine-tunes) and config.gin describing the converted sizes. --bandwidth KBPS keeps
            the RVQ levels EnCodec uses at that bandwidth (its rule: floor(KBPS / (log2(codebook) x frame rate)),
            at least one, at most all: 6 kbps is 8 of the 24 kHz model's 32 levels), so the codec's tokens are
            EnCodec's at KBPS; default all levels.
  hubert    a transformers HubertModel folder (HuBERT, or MERT: config.json + weights, optionally
            preprocessor_config.json giving the sampling rate) -> a run directory of gin/semantic/hubert.gin: the
            frozen feature model (hubert_model.HubertFeatureModel) with config.gin describing the converted sizes.
  clap      a transformers ClapModel folder (config.json + weights, optionally preprocessor_config.json and the
            tokenizer files) -> a MuLan run directory of gin/mulan/clap.gin (HTSAT audio tower, RoBERTa text
            tower, projections) with the checkpoint's tokenizer.json copied in for `MuLan.embed_text`.
  vggish    a torch state dict file in torchvggish's layout (the released vggish-10086976.pth), and optionally
            --pca with the PCA postprocessor's file (vggish_pca_params-970ea276.pth) -> a run directory of
            gin/eval/vggish.gin (frozen; vggish_model.VGGishEmbedder), the PCA as vggish_pca.npz beside it.
            --final_relu keeps torchvggish's ReLU on the embedding (FAD uses the embedding without it).
  passt     a torch state dict file of hear21passt's PaSST (the released passt-s-f128-p16-s10-ap.476-swa.pt, the
            state dict of get_basic_model(mode="logits").net, or of the whole wrapper: `net.` stripped,
            `device_proxy` dropped) -> a run directory of gin/eval/passt.gin (frozen;
            passt_model.PaSSTClassifier) with config.gin describing the converted sizes.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # conversion never downloads

from musiclm_jax import run_directory  # noqa: E402


def _bindings(prefix: str, config) -> list[str]:
    return [f"{prefix}.{f.name} = {getattr(config, f.name)!r}" for f in dataclasses.fields(config)]


def convert_encodec_dir(source: str, model_dir: str, bandwidth_kbps: Optional[float] = None) -> str:
    """Converts the transformers EnCodec checkpoint folder `source` into run directory `model_dir`, with the RVQ
    levels EnCodec uses at `bandwidth_kbps` (None: all)."""
    from transformers import EncodecModel

    from musiclm_jax.convert.encodec import convert_encodec, keep_levels, num_quantizers_for_bandwidth

    if not os.path.isdir(source):
        raise FileNotFoundError(f"--from {source!r} is not a directory with an EncodecModel (config.json + weights)")
    model = EncodecModel.from_pretrained(source).eval()
    params, state, seanet, rvq, sample_rate = convert_encodec(model)
    if bandwidth_kbps is not None:
        if bandwidth_kbps <= 0:
            raise ValueError(f"--bandwidth {bandwidth_kbps}: a bitrate in kbit/s, above 0")
        frame_rate = sample_rate / math.prod(seanet.strides)
        levels = min(rvq.num_quantizers, num_quantizers_for_bandwidth(bandwidth_kbps, rvq.codebook_size, frame_rate))
        state, rvq = keep_levels(state, rvq, levels)
    bindings = [f"SAMPLE_RATE = {sample_rate}"]
    bindings += _bindings("seanet.SEANetConfig", seanet) + _bindings("quantizers.RVQConfig", rvq)
    return run_directory.write_run_directory(model_dir, "gin/codec/encodec_24khz.gin", bindings, params, "EnCodec",
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
    return run_directory.write_run_directory(model_dir, "gin/semantic/hubert.gin", bindings, params, "HuBERT")


_CLAP_FEATURES = {"sampling_rate": "sample_rate", "hop_length": "hop_length", "fft_window_size": "fft_window_size",
                  "max_length_s": "max_length_s", "frequency_min": "frequency_min", "frequency_max": "frequency_max"}


def convert_clap_dir(source: str, model_dir: str, text_length: int = 77) -> str:
    """Converts the transformers CLAP checkpoint folder `source` into MuLan run directory `model_dir`."""
    import json
    import shutil

    from transformers import ClapModel

    from musiclm_jax.convert.clap import convert_clap, gin_bindings

    if not os.path.isdir(source):
        raise FileNotFoundError(f"--from {source!r} is not a directory with a ClapModel (config.json + weights)")
    feature_settings = {}
    preprocessor = os.path.join(source, "preprocessor_config.json")
    if os.path.exists(preprocessor):
        with open(preprocessor) as f:
            extractor = json.load(f)
        feature_settings = {ours: extractor[theirs] for theirs, ours in _CLAP_FEATURES.items() if theirs in extractor}
    model = ClapModel.from_pretrained(source).eval()
    params, config = convert_clap(model, text_length, **feature_settings)
    run_directory.write_run_directory(model_dir, "gin/mulan/clap.gin", gin_bindings(config, text_length),
                                           params, "CLAP")
    tokenizer = os.path.join(source, "tokenizer.json")
    if os.path.exists(tokenizer):
        shutil.copy(tokenizer, os.path.join(model_dir, "tokenizer.json"))
    else:
        print(f"convert: {source} has no tokenizer.json; MuLan.embed_text needs one in {model_dir}", file=sys.stderr)
    return model_dir


def convert_vggish_file(source: str, model_dir: str, pca: Optional[str] = None, final_relu: bool = False) -> str:
    """Converts the torchvggish state dict file `source` (and PCA file `pca`) into run directory `model_dir`."""
    import numpy as np
    import torch

    from musiclm_jax.convert.vggish import convert_vggish, convert_vggish_pca
    from musiclm_jax.evaluation.vggish_model import PCA_FILE

    for path in filter(None, (source, pca)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} is not a file (expected a torch state dict saved with torch.save)")
    params = convert_vggish(torch.load(source, map_location="cpu", weights_only=True))
    pca_params = convert_vggish_pca(torch.load(pca, map_location="cpu", weights_only=False)) if pca else None
    run_directory.write_run_directory(model_dir, "gin/eval/vggish.gin",
                                           [f"vggish.VGGishConfig.final_relu = {final_relu}"], params, "VGGish")
    if pca_params is not None:
        np.savez(os.path.join(model_dir, PCA_FILE), **pca_params)
    return model_dir


def convert_passt_file(source: str, model_dir: str) -> str:
    """Converts the hear21passt PaSST state dict file `source` into run directory `model_dir`."""
    import torch

    from musiclm_jax.convert.passt import config_from_state_dict, convert_passt, gin_bindings, strip_wrapper

    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source!r} is not a file (expected a torch state dict saved with torch.save)")
    state_dict = strip_wrapper(torch.load(source, map_location="cpu", weights_only=True))
    config = config_from_state_dict(state_dict)
    params = convert_passt(state_dict, config)
    return run_directory.write_run_directory(model_dir, "gin/eval/passt.gin", gin_bindings(config), params,
                                                  "PaSST")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m musiclm_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["encodec", "hubert", "clap", "vggish", "passt"])
    parser.add_argument("--from", dest="source", required=True, help="checkpoint folder (vggish, passt: file)")
    parser.add_argument("--to", dest="model_dir", required=True, help="run directory to write")
    parser.add_argument("--pca", default=None, help="vggish: the PCA postprocessor's parameter file")
    parser.add_argument("--final_relu", action="store_true", help="vggish: keep torchvggish's ReLU on the embedding")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="encodec: keep the RVQ levels of this bitrate in kbit/s (default: all levels)")
    args = parser.parse_args(argv)
    if args.kind != "vggish" and (args.pca or args.final_relu):
        raise SystemExit("--pca and --final_relu apply to vggish only")
    if args.kind != "encodec" and args.bandwidth is not None:
        raise SystemExit("--bandwidth applies to encodec only")
    if args.kind == "encodec":
        convert_encodec_dir(args.source, args.model_dir, args.bandwidth)
    elif args.kind == "hubert":
        convert_hubert_dir(args.source, args.model_dir)
    elif args.kind == "clap":
        convert_clap_dir(args.source, args.model_dir)
    elif args.kind == "vggish":
        convert_vggish_file(args.source, args.model_dir, args.pca, args.final_relu)
    elif args.kind == "passt":
        convert_passt_file(args.source, args.model_dir)
    print(f"convert: {args.kind} {args.source} -> {args.model_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
