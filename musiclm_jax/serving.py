"""Generation from an export bundle (`python -m musiclm_jax.export`): no gin, no checkpoints, no Flax models.

    from musiclm_jax import serving
    model = serving.load("/bundles/musiclm")
    model.set_generation_params(duration_s=4.0, guidance_scale=3.0, seed=0)
    audio = model.generate(["calm piano", "loud rock drums"])     # [2, 4 s * model.sample_rate] float32

The bundle's functions, exported with jax.export for a symbolic batch size, are plugged into the driver of
pipeline.MusicLM (sliding windows, guidance and sampling: pipeline.sample_window), so a bundle gives the audio of
the MusicLM it was exported from, bit for bit, for the same seed and settings (tests/test_export.py).

Bundle layout (FORMAT_VERSION 1; every file is listed in bundle.json with its size and SHA-256):

    bundle.json                 format, format_version, jax version, platforms, the models' constants (rates,
                                levels, text length), the function table and `files` {path: {bytes, sha256}}
    config.gin                  the resolved gin config of the export (for the record; serving never reads it)
    generation.json             the default generation settings (pipeline.GenerationParams fields)
    vocab/text/spm.model        MuLan's caption vocabulary (or tokenizer.json for an imported CLAP)
    vocab/token_layouts.json    each stage's token layout, prefix/target groups, lengths, guidance groups
    params/<part>.npz           parameters only (no optimizer state, no training statistics), flattened to
                                'a/b/c' keys; parts: mulan (text tower), mulan_rvq (codebooks), codec (decoder
                                and codebooks), semantic, coarse, fine
    exported/<function>.jaxexp  jax.export serializations (symbolic batch 'b'); arguments (params, ...):
                                  mulan_embed_text(params, tokens [b, L] int32, mask [b, L] int32) -> [b, D]
                                  mulan_quantize(params, embeddings [b, D]) -> codes [b, levels] int32
                                  codec_decode(params, codes [b, f, levels] int32) -> audio [b, f * hop] float32
                                  <stage>_prefill(params, tokens [b, p], prefix_mask [b, p] bool,
                                                  slots int8 [c]) -> (logits [b, V], KV cache of capacity c)
                                  <stage>_step(params, tokens [b, 1], cache) -> (logits [b, V], cache)
    saved_model/<part>/         (with --saved_model) TF SavedModels of the same functions (jax2tf)

Loading checks the format and version, then that every listed file exists and has its size and checksum, and
names the file (or version) that does not.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np

from musiclm_jax import pipeline

FORMAT = "musiclm_jax.serving_bundle"
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
GENERATION_FILE = "generation.json"
CONFIG_FILE = "config.gin"
LAYOUTS_FILE = "vocab/token_layouts.json"
TEXT_VOCAB_DIR = "vocab/text"
PARTS = ("mulan", "mulan_rvq", "codec") + pipeline.STAGES


def params_file(part: str) -> str:
    return f"params/{part}.npz"


def function_file(name: str) -> str:
    return f"exported/{name}.jaxexp"


def function_parts() -> dict[str, str]:
    """The exported functions of a format-1 bundle: {function: the params part it takes first}."""
    parts = {"mulan_embed_text": "mulan", "mulan_quantize": "mulan_rvq", "codec_decode": "codec"}
    for stage in pipeline.STAGES:
        parts[f"{stage}_prefill"] = parts[f"{stage}_step"] = stage
    return parts


class BundleError(ValueError):
    """A bundle that cannot be served: wrong format version, a missing, resized or corrupt file."""


# ------------------------------------------------------------------------------------------------ files
def file_entry(path: str) -> dict:
    """{'bytes', 'sha256'} of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def save_tree(path: str, tree: Any) -> None:
    """Writes a nested dict of arrays as an .npz of 'a/b/c' keys (bfloat16 and other non-numpy dtypes are stored
    as raw bits, their dtype names in the '__dtypes__' entry)."""
    arrays, dtypes = {}, {}

    def visit(prefix, node):
        if isinstance(node, dict) or hasattr(node, "items"):
            for key, value in node.items():
                if "/" in str(key):
                    raise ValueError(f"parameter name {key!r} contains '/'")
                visit(f"{prefix}/{key}" if prefix else str(key), value)
            return
        array = np.asarray(node)
        if array.dtype.kind == "V" or array.dtype.name not in np.sctypeDict:  # bfloat16 & co (ml_dtypes)
            dtypes[prefix] = array.dtype.name
            array = array.view(f"u{array.dtype.itemsize}")
        arrays[prefix] = array
    visit("", tree)
    with open(path, "wb") as f:
        np.savez(f, __dtypes__=np.asarray(json.dumps(dtypes)), **arrays)


def load_tree(path: str) -> dict:
    """Inverse of save_tree: the nested dict of numpy arrays."""
    import jax.numpy as jnp
    out: dict = {}
    with np.load(path, allow_pickle=False) as f:
        dtypes = json.loads(str(f["__dtypes__"])) if "__dtypes__" in f.files else {}
        for key in f.files:
            if key == "__dtypes__":
                continue
            array = f[key]
            if key in dtypes:
                array = array.view(jnp.dtype(dtypes[key]))
            node = out
            *parents, leaf = key.split("/")
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = array
    return out


def read_manifest(bundle_dir: str, verify: bool = True) -> dict:
    """bundle.json, after checking the format version and (verify) every listed file's size and SHA-256."""
    path = os.path.join(bundle_dir, MANIFEST)
    if not os.path.exists(path):
        raise BundleError(f"{path} not found: {bundle_dir} is not a serving bundle (write one with "
                          f"python -m musiclm_jax.export)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a {FORMAT} manifest (format {manifest.get('format')!r})"
                          if isinstance(manifest, dict) else f"{path}: not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format_version {version!r}, but this musiclm_jax reads format_version "
                          f"{FORMAT_VERSION}; export the bundle again with this version")
    files = manifest.get("files", {})
    required = [GENERATION_FILE, LAYOUTS_FILE, manifest.get("mulan", {}).get("tokenizer", TEXT_VOCAB_DIR)]
    required += [params_file(p) for p in PARTS] + [function_file(n) for n in function_parts()]
    for name in required:
        if name not in files:
            raise BundleError(f"{path} does not list the file {name}")
    for name, entry in sorted(files.items()):
        file = os.path.join(bundle_dir, name)
        if not os.path.isfile(file):
            raise BundleError(f"{file}: missing file of the bundle (listed in {MANIFEST})")
        size = os.path.getsize(file)
        if size != entry["bytes"]:
            raise BundleError(f"{file}: {size} bytes, but {MANIFEST} lists {entry['bytes']} (truncated or replaced)")
        if verify and file_entry(file)["sha256"] != entry["sha256"]:
            raise BundleError(f"{file}: SHA-256 checksum differs from {MANIFEST} (corrupt or modified)")
    return manifest


def _backend_platforms() -> tuple[str, ...]:
    backend = jax.default_backend()
    return {"gpu": ("cuda", "rocm")}.get(backend, (backend,))


def load_function(bundle_dir: str, name: str):
    """The deserialized jax.export.Exported of exported/<name>.jaxexp (checked against this backend)."""
    from jax import export
    path = os.path.join(bundle_dir, function_file(name))
    with open(path, "rb") as f:
        blob = f.read()
    try:
        exported = export.deserialize(bytearray(blob))
    except Exception as e:  # a file that passed its checksum but this jax cannot read
        raise BundleError(f"{path}: cannot deserialize the exported function ({type(e).__name__}: {e})") from None
    if not set(_backend_platforms()) & set(exported.platforms):
        raise BundleError(f"{path} was exported for {exported.platforms}, not for this {jax.default_backend()} "
                          f"backend; export with --platforms including it")
    return exported


# ------------------------------------------------------------------------------------------------ served parts
class ServedMuLan:
    """MuLan's text side from a bundle: captions -> conditioning tokens (what pipeline.MusicLM uses)."""

    def __init__(self, tokenizer, text_length: int, params, rvq_params, embed_text, quantize):
        self.tokenizer, self.text_length = tokenizer, int(text_length)
        self.params, self.rvq_params = params, rvq_params
        self._embed_text, self._quantize = jax.jit(embed_text.call), jax.jit(quantize.call)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """captions -> [len(texts), dim] unit-norm embeddings."""
        if isinstance(texts, str):
            raise TypeError("embed_text takes a list of captions")
        tokens, mask = self.tokenizer.encode(list(texts), self.text_length)
        return np.asarray(self._embed_text(self.params, tokens, mask))

    def tokens_from_text(self, texts: Sequence[str]) -> np.ndarray:
        """captions -> conditioning tokens [len(texts), levels] int32."""
        return np.asarray(self._quantize(self.rvq_params, np.asarray(self.embed_text(texts), np.float32)))


class ServedCodec:
    """The codec's decoder from a bundle, with the attributes of codec.Codec that pipeline.MusicLM reads."""

    def __init__(self, params, decode, sample_rate: int, hop_length: int, num_quantizers: int, codebook_size: int):
        self.params, self._decode = params, jax.jit(decode.call)
        self.sample_rate, self.hop_length = int(sample_rate), int(hop_length)
        self.num_quantizers, self.codebook_size = int(num_quantizers), int(codebook_size)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def decode(self, codes) -> np.ndarray:
        """codes [batch, frames, num_quantizers] -> audio [batch, frames * hop_length] float32."""
        codes = np.asarray(codes, np.int32)
        if codes.ndim != 3 or codes.shape[-1] != self.num_quantizers or codes.min() < 0 or \
                codes.max() >= self.codebook_size:
            raise ValueError(f"codes of shape {codes.shape} do not fit [batch, frames, {self.num_quantizers}] levels "
                             f"of {self.codebook_size} codes")
        return np.asarray(self._decode(self.params, codes))


class ServedStage(pipeline.Stage):
    """A stage from a bundle: its StageSpec as `model`, and the exported prefill and step as decoder functions."""

    def __init__(self, spec: pipeline.StageSpec, params, name: str, prefill, step):
        super().__init__(spec, params, name)
        self.exported = {"prefill": prefill, "step": step}

    def decoder_functions(self):
        return self.exported["prefill"].call, self.exported["step"].call


# ------------------------------------------------------------------------------------------------ the model
class ServingModel:
    """Text -> music from a bundle: generate(texts), set_generation_params(**kwargs), sample_rate.

    `musiclm` is the pipeline.MusicLM driving the served parts (story mode and melody work through it too;
    continuation and reranking need the audio encoders, which a bundle does not hold)."""

    def __init__(self, musiclm: pipeline.MusicLM, manifest: dict, defaults: dict, bundle_dir: str):
        self.musiclm, self.manifest, self.bundle_dir = musiclm, manifest, bundle_dir
        self.defaults = dict(defaults)
        self.reset_generation_params()

    @property
    def sample_rate(self) -> int:
        """Hz of the audio generate() returns."""
        return int(self.musiclm.codec.sample_rate)

    @property
    def params(self) -> pipeline.GenerationParams:
        return self.musiclm.params

    def set_generation_params(self, **kwargs) -> None:
        """Sets fields of pipeline.GenerationParams (duration_s, temperature, top_k, top_p, guidance_scale,
        seed)."""
        self.musiclm.set_generation_params(**kwargs)

    def reset_generation_params(self) -> None:
        """Back to the bundle's default settings (generation.json)."""
        self.musiclm.params = pipeline.GenerationParams()
        self.musiclm.set_generation_params(**self.defaults)

    def generate(self, texts: Sequence[str], melody: Optional[np.ndarray] = None) -> np.ndarray:
        """Captions -> audio [len(texts), duration_s * sample_rate] float32 (pipeline.MusicLM.generate)."""
        return self.musiclm.generate(texts, melody=melody)

    def fork(self) -> "ServingModel":
        """Another model sharing the loaded functions and parameters, with its own generation settings (one per
        concurrent request)."""
        m = self.musiclm
        stages = [m.stages[name] for name in pipeline.STAGES]
        musiclm = pipeline.MusicLM(m.mulan, m.codec, *stages, log=None, **_rates(self.manifest))
        forked = ServingModel(musiclm, self.manifest, self.defaults, self.bundle_dir)
        musiclm.set_generation_params(**dataclasses.asdict(m.params))
        return forked


def load(bundle_dir: str, verify: bool = True, log=None) -> ServingModel:
    """The ServingModel of an export bundle. verify=False skips the SHA-256 checks (sizes are still checked)."""
    from musiclm_jax import text_vocab
    manifest = read_manifest(bundle_dir, verify)

    def path(name):
        return os.path.join(bundle_dir, name)

    def params(part):
        try:
            return jax.device_put(load_tree(path(params_file(part))))
        except Exception as e:
            raise BundleError(f"{path(params_file(part))}: cannot read the parameters ({e})") from None
    functions = {name: load_function(bundle_dir, name) for name in function_parts()}
    with open(path(LAYOUTS_FILE)) as f:
        specs = {name: pipeline.StageSpec.from_json(d) for name, d in json.load(f).items()}
    with open(path(GENERATION_FILE)) as f:
        defaults = json.load(f)
    m, c = manifest["mulan"], manifest["codec"]
    mulan = ServedMuLan(text_vocab.TextTokenizer(path(m["tokenizer"])), m["text_length"], params("mulan"),
                        params("mulan_rvq"), functions["mulan_embed_text"], functions["mulan_quantize"])
    codec = ServedCodec(params("codec"), functions["codec_decode"], manifest["sample_rate"], c["hop_length"],
                        c["num_quantizers"], c["codebook_size"])
    stages = [ServedStage(specs[name], params(name), name, functions[f"{name}_prefill"], functions[f"{name}_step"])
              for name in pipeline.STAGES]
    musiclm = pipeline.MusicLM(mulan, codec, *stages, log=log, **_rates(manifest))
    return ServingModel(musiclm, manifest, defaults, bundle_dir)


def _rates(manifest: dict) -> dict:
    rates = {"semantic_rate": manifest["semantic_rate"]}
    if manifest.get("melody_rate"):
        rates["melody_rate"] = manifest["melody_rate"]
    return rates
