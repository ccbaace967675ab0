"""Generation from an export bundle (`python -m musiclm_jax.export`): no gin, no checkpoints, no Flax models.

    from musiclm_jax.serving import bundle as serving
    model = serving.load("/bundles/musiclm")
    model.set_generation_params(duration_s=4.0, guidance_scale=3.0, seed=0)
    audio = model.generate(["calm piano", "loud rock drums"])     # [2, 4 s * model.sample_rate] float32
    for chunk in model.generate_stream(["calm piano"]): ...       # [1, n] float32 chunks, the same samples
    audio = model.generate(["calm piano"], rerank=4)              # the best of 4 by MuLan score
    audio = model.generate_continuation(clip, ["calm piano"])     # clip [samples] at model.sample_rate

The bundle's functions, exported with jax.export for a symbolic batch size, are plugged into the driver of
pipeline.MusicLM (sliding windows, guidance and sampling: stage_sampling.sample_window), so a bundle gives the audio
of the MusicLM it was exported from, bit for bit, for the same seed and settings (tests/test_export.py).

Bundle layout (FORMAT_VERSION 1; every file is listed in bundle.json with its size and SHA-256):

    bundle.json                 format, format_version, jax version, platforms, the models' constants (rates,
                                levels, text length), the function table and `files` {path: {bytes, sha256}}
    config.gin                  the resolved gin config of the export (for the record; serving never reads it)
    generation.json             the default generation settings (generation_params.GenerationParams fields)
    vocab/text/spm.model        MuLan's caption vocabulary (or tokenizer.json for an imported CLAP)
    vocab/token_layouts.json    each stage's token layout, prefix/target groups, lengths, guidance groups
    params/<part>.npz           parameters only (no optimizer state, no training statistics), flattened to
                                'a/b/c' keys; parts: mulan (text tower), mulan_rvq (codebooks), codec (decoder
                                and codebooks), semantic, coarse, fine; optional (ENCODER_PARTS): codec_encoder,
                                mulan_audio (audio tower), semantic_features (the feature model),
                                semantic_kmeans (centres), semantic_normalization (mean, std)
    exported/<function>.jaxexp  jax.export serializations (symbolic batch 'b'); arguments (params, ...):
                                  mulan_embed_text(params, tokens [b, L] int32, mask [b, L] int32) -> [b, D]
                                  mulan_quantize(params, embeddings [b, D]) -> codes [b, levels] int32
                                  codec_decode(params, codes [b, f, levels] int32) -> audio [b, f * hop] float32
                                  <stage>_prefill(params, tokens [b, p], prefix_mask [b, p] bool,
                                                  slots int8 [c]) -> (logits [b, V], KV cache of capacity c)
                                  <stage>_step(params, tokens [b, 1], cache) -> (logits [b, V], cache)
                                optional, for continuation and reranking (ENCODER_FUNCTIONS):
                                  codec_encode(params, audio [b, s] float32) -> codes [b, ceil(s / hop), levels]
                                  mulan_embed_audio(params, audio [b, window] float32) -> [b, D] at mulan's rate
                                  semantic_features(params, audio [b, s] float32 at the tokenizer's rate)
                                      -> features [b, t, d]
                                  semantic_assign(params, normalised features [b, t, d]) -> ids [b, t] int32
    saved_model/<part>/         (with --saved_model) TF SavedModels of the same functions (jax2tf)

Loading checks the format and version, then that every listed file exists and has its size and checksum, and
names the file (or version) that does not. The encoders are optional within format 1: a bundle without them (an
older one, or `--no_encoders`) generates, and ServingModel.missing('continuation' | 'rerank') names what it lacks.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np

from musiclm_jax.generation import params as generation_params
from musiclm_jax.generation import pipeline
from musiclm_jax.generation import stage_sampling

FORMAT = "musiclm_jax.serving_bundle"
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
GENERATION_FILE = "generation.json"
CONFIG_FILE = "config.gin"
LAYOUTS_FILE = "vocab/token_layouts.json"
TEXT_VOCAB_DIR = "vocab/text"
PARTS = ("mulan", "mulan_rvq", "codec") + pipeline.STAGES
ENCODER_PARTS = ("codec_encoder", "mulan_audio", "semantic_features", "semantic_kmeans", "semantic_normalization")
# The optional functions: {function: the params part it takes first}.
ENCODER_FUNCTIONS = {"codec_encode": "codec_encoder", "mulan_embed_audio": "mulan_audio",
                     "semantic_features": "semantic_features", "semantic_assign": "semantic_kmeans"}
# What each served feature needs beyond generation.
FEATURE_FUNCTIONS = {"continuation": ("codec_encode", "semantic_features", "semantic_assign"),
                     "rerank": ("mulan_embed_audio",)}


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
    """MuLan from a bundle: captions -> conditioning tokens (what pipeline.MusicLM uses), and with the audio tower
    (`audio`: {'params', 'function', and the manifest's sample_rate, window_samples, stride, batch_size,
    short_clip_padding}) clip embeddings for reranking (pipeline.MusicLM.mulan_scores)."""

    def __init__(self, tokenizer, text_length: int, params, rvq_params, embed_text, quantize,
                 audio: Optional[dict] = None):
        self.tokenizer, self.text_length = tokenizer, int(text_length)
        self.params, self.rvq_params = params, rvq_params
        self._embed_text, self._quantize = jax.jit(embed_text.call), jax.jit(quantize.call)
        self.audio = audio
        if audio is not None:
            self._embed_windows = jax.jit(audio["function"].call)

    @property
    def sample_rate(self) -> int:
        """Hz of the audio embed_audio takes."""
        return int(self._require_audio()["sample_rate"])

    def _require_audio(self) -> dict:
        if self.audio is None:
            raise BundleError("this bundle has no MuLan audio tower (exported/mulan_embed_audio.jaxexp): export it "
                              "again without --no_encoders")
        return self.audio

    def embed_audio(self, audio) -> np.ndarray:
        """audio [batch, samples] (or [samples]) at sample_rate -> unit-norm clip embeddings [batch, D] (or [D]),
        as mulan.MuLan.embed_audio (mulan.embed_clips: the mean over windows)."""
        from musiclm_jax.mulan import inference as mulan
        a = self._require_audio()
        return mulan.embed_clips(audio, a["window_samples"], a["stride"], a["short_clip_padding"],
                                 lambda windows: mulan.embed_in_batches(
                                     windows, a["batch_size"], lambda x: self._embed_windows(a["params"], x)))

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

    def __init__(self, params, decode, sample_rate: int, hop_length: int, num_quantizers: int, codebook_size: int,
                 causal: bool = False, encoder_params=None, encode=None):
        self.params, self._decode = params, jax.jit(decode.call)
        self.sample_rate, self.hop_length = int(sample_rate), int(hop_length)
        self.num_quantizers, self.codebook_size = int(num_quantizers), int(codebook_size)
        self.causal = bool(causal)  # a prefix of codes decodes to the whole's first samples (codec.Codec.causal)
        self.encoder_params = encoder_params
        self._encode = None if encode is None else jax.jit(encode.call)

    def encode(self, audio) -> np.ndarray:
        """audio [batch, samples] at sample_rate -> codes [batch, ceil(samples / hop_length), num_quantizers]
        int32 (codec.Codec.encode with every level)."""
        if self._encode is None:
            raise BundleError("this bundle has no codec encoder (exported/codec_encode.jaxexp): export it again "
                              "without --no_encoders")
        return np.asarray(self._encode(self.encoder_params, np.asarray(audio, np.float32)))

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


class ServedSemanticTokenizer:
    """The semantic tokenizer from a bundle (semantic.SemanticTokenizer.tokenize): the feature model's layer
    features, normalised per dimension (numpy, as SemanticTokenizer), then the nearest k-means centre."""

    def __init__(self, feature_params, features, normalization: dict, kmeans_params, assign, sample_rate: int,
                 frame_rate: float):
        self.feature_params, self.kmeans_params = feature_params, kmeans_params
        self._features, self._assign = jax.jit(features.call), jax.jit(assign.call)
        self.mean = np.asarray(normalization["mean"], np.float32)
        self.std = np.asarray(normalization["std"], np.float32)
        self.sample_rate, self.frame_rate = int(sample_rate), float(frame_rate)

    def tokenize(self, audio) -> np.ndarray:
        """audio [batch, samples] at sample_rate -> tokens [batch, frames] int32 at frame_rate."""
        features = np.asarray(self._features(self.feature_params, np.asarray(audio, np.float32)))
        return np.asarray(self._assign(self.kmeans_params, (features - self.mean) / self.std))


class ServedStage(stage_sampling.Stage):
    """A stage from a bundle: its StageSpec as `model`, and the exported prefill and step as decoder functions."""

    def __init__(self, spec: stage_sampling.StageSpec, params, name: str, prefill, step):
        super().__init__(spec, params, name)
        self.exported = {"prefill": prefill, "step": step}

    def decoder_functions(self):
        return self.exported["prefill"].call, self.exported["step"].call


# ------------------------------------------------------------------------------------------------ the model
class ServingModel:
    """Text -> music from a bundle: generate(texts), generate_stream(texts), generate_continuation(audio, texts),
    each with this object's settings (set_generation_params) or a call's own (params=generation_params(...): the
    object keeps no per-call state, so concurrent calls can share it), sample_rate.

    `musiclm` is the pipeline.MusicLM driving the served parts (story mode and melody work through it too);
    continuation and reranking need the bundle's audio encoders (missing() names what a bundle lacks)."""

    def __init__(self, musiclm: pipeline.MusicLM, manifest: dict, defaults: dict, bundle_dir: str):
        self.musiclm, self.manifest, self.bundle_dir = musiclm, manifest, bundle_dir
        self.defaults = dict(defaults)
        self.reset_generation_params()

    @property
    def sample_rate(self) -> int:
        """Hz of the audio generate() returns."""
        return int(self.musiclm.codec.sample_rate)

    @property
    def params(self) -> generation_params.GenerationParams:
        return self.musiclm.params

    def missing(self, feature: str) -> list[str]:
        """The exported functions `feature` ('continuation' or 'rerank') needs that this bundle does not hold
        (empty: it can serve it)."""
        return [f for f in FEATURE_FUNCTIONS[feature] if f not in self.manifest.get("functions", {})]

    def _require(self, feature: str) -> None:
        missing = self.missing(feature)
        if missing:
            raise BundleError(f"{self.bundle_dir}: {feature} needs {', '.join(function_file(f) for f in missing)}, "
                              f"which this bundle does not hold; export it again with this musiclm_jax (without "
                              f"--no_encoders"
                              f"{', with a SEMANTIC_TOKENIZER' if 'semantic_features' in missing else ''})")

    def set_generation_params(self, **kwargs) -> None:
        """Sets fields of generation_params.GenerationParams (duration_s, temperature, top_k, top_p, guidance_scale,
        seed)."""
        self.musiclm.set_generation_params(**kwargs)

    def generation_params(self, **kwargs) -> generation_params.GenerationParams:
        """This object's settings with `kwargs` replaced, for one call's `params=` (the object is unchanged)."""
        return self.musiclm.generation_params(**kwargs)

    def reset_generation_params(self) -> None:
        """Back to the bundle's default settings (generation.json)."""
        self.musiclm.params = generation_params.GenerationParams()
        self.musiclm.set_generation_params(**self.defaults)

    def generate(self, texts: Sequence[str], melody: Optional[np.ndarray] = None, rerank: int = 1,
                 return_details: bool = False, params: Optional[generation_params.GenerationParams] = None):
        """Captions -> audio [len(texts), duration_s * sample_rate] float32 (pipeline.MusicLM.generate; rerank=N
        keeps the best of N candidates by MuLan score, which needs the audio tower; return_details: the
        generation_params.GenerationResult with the scores [B, N] and choice [B])."""
        if rerank != 1:
            self._require("rerank")
        return self.musiclm.generate(texts, rerank=rerank, melody=melody, return_details=return_details,
                                     params=params)

    def generate_stream(self, texts: Sequence[str], melody: Optional[np.ndarray] = None,
                        params: Optional[generation_params.GenerationParams] = None):
        """generate's audio as consecutive chunks [len(texts), n] float32 (pipeline.MusicLM.generate_stream)."""
        return self.musiclm.generate_stream(texts, melody=melody, params=params)

    def generate_continuation(self, prompt_audio: np.ndarray, texts: Sequence[str],
                              params: Optional[generation_params.GenerationParams] = None) -> np.ndarray:
        """prompt_audio [B or 1, samples] (or [samples]) at sample_rate continued under the captions -> audio
        [B, duration_s * sample_rate] float32 (pipeline.MusicLM.generate_continuation)."""
        self._require("continuation")
        return self.musiclm.generate_continuation(prompt_audio, texts, params=params)

    def generate_continuation_stream(self, prompt_audio: np.ndarray, texts: Sequence[str],
                                     params: Optional[generation_params.GenerationParams] = None):
        """generate_continuation's audio as consecutive chunks [B, n] float32."""
        self._require("continuation")
        return self.musiclm.generate_continuation_stream(prompt_audio, texts, params=params)


def load(bundle_dir: str, verify: bool = True, log=None) -> ServingModel:
    """The ServingModel of an export bundle. verify=False skips the SHA-256 checks (sizes are still checked)."""
    from musiclm_jax.mulan import text_vocab
    manifest = read_manifest(bundle_dir, verify)

    def path(name):
        return os.path.join(bundle_dir, name)

    def params(part):
        try:
            return jax.device_put(load_tree(path(params_file(part))))
        except Exception as e:
            raise BundleError(f"{path(params_file(part))}: cannot read the parameters ({e})") from None
    listed = manifest.get("functions", {})
    functions = {name: load_function(bundle_dir, name)
                 for name in list(function_parts()) + [n for n in ENCODER_FUNCTIONS if n in listed]}
    with open(path(LAYOUTS_FILE)) as f:
        specs = {name: stage_sampling.StageSpec.from_json(d) for name, d in json.load(f).items()}
    with open(path(GENERATION_FILE)) as f:
        defaults = json.load(f)
    m, c = manifest["mulan"], manifest["codec"]
    audio_tower = None
    if "mulan_embed_audio" in functions:
        audio_tower = {"params": params("mulan_audio"), "function": functions["mulan_embed_audio"],
                       **{k: m[k] for k in ("sample_rate", "window_samples", "stride", "batch_size",
                                            "short_clip_padding")}}
    mulan = ServedMuLan(text_vocab.TextTokenizer(path(m["tokenizer"])), m["text_length"], params("mulan"),
                        params("mulan_rvq"), functions["mulan_embed_text"], functions["mulan_quantize"], audio_tower)
    encode = functions.get("codec_encode")
    codec = ServedCodec(params("codec"), functions["codec_decode"], manifest["sample_rate"], c["hop_length"],
                        c["num_quantizers"], c["codebook_size"], c.get("causal", False),
                        None if encode is None else params("codec_encoder"), encode)
    tokenizer = None
    if "semantic_features" in functions and "semantic_assign" in functions:
        t = manifest["semantic_tokenizer"]
        tokenizer = ServedSemanticTokenizer(params("semantic_features"), functions["semantic_features"],
                                            load_tree(path(params_file("semantic_normalization"))),
                                            params("semantic_kmeans"), functions["semantic_assign"],
                                            t["sample_rate"], t["frame_rate"])
    stages = [ServedStage(specs[name], params(name), name, functions[f"{name}_prefill"], functions[f"{name}_step"])
              for name in pipeline.STAGES]
    musiclm = pipeline.MusicLM(mulan, codec, *stages, log=log, semantic_tokenizer=tokenizer, **_rates(manifest))
    return ServingModel(musiclm, manifest, defaults, bundle_dir)


def _rates(manifest: dict) -> dict:
    rates = {"semantic_rate": manifest["semantic_rate"]}
    if manifest.get("melody_rate"):
        rates["melody_rate"] = manifest["melody_rate"]
    return rates
