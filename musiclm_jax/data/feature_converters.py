"""seqio feature converters for the stages (data side: imports TensorFlow and seqio).

PrefixLMFeatureConverter — one example with `inputs` (the stage's conditioning tokens, P of them) and
`targets` (T tokens), both global ids of the stage's TokenLayout, becomes, at length L = P + T (padded with 0):

    position                 0     1 .. P-1     P      P+1 .. P+T-1
    decoder_input_tokens     0     in_0..in_P-2 in_P-1 tg_0 .. tg_T-2
    decoder_target_tokens    in_0  in_1..in_P-1 tg_0   tg_1 .. tg_T-1
    decoder_loss_weights     0     0 .. 0       1      1 .. 1
    decoder_causal_attention 1     1 .. 1       1      0 .. 0

i.e. the loss is on target tokens only, and the P prefix positions plus the one that predicts the first target
(P + 1 positions) form the bidirectional prefix of a prefix LM (as in t5x). Packing is not supported: stage
examples have fixed lengths.
"""
from __future__ import annotations

import seqio
import tensorflow as tf

Spec = seqio.FeatureConverter.FeatureSpec


class PrefixLMFeatureConverter(seqio.FeatureConverter):
    """inputs + targets -> decoder_{input,target}_tokens, decoder_loss_weights, decoder_causal_attention."""

    TASK_FEATURES = {"inputs": Spec(dtype=tf.int32), "targets": Spec(dtype=tf.int32)}
    MODEL_FEATURES = {
        "decoder_input_tokens": Spec(dtype=tf.int32),
        "decoder_target_tokens": Spec(dtype=tf.int32),
        "decoder_loss_weights": Spec(dtype=tf.int32),
        "decoder_causal_attention": Spec(dtype=tf.int32),
    }
    PACKING_FEATURE_DTYPES = {}

    def __init__(self, pack: bool = False, **kwargs):
        if pack:
            raise ValueError("PrefixLMFeatureConverter does not pack: stage examples have fixed lengths")
        super().__init__(pack=False, **kwargs)

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths):
        length = self.get_model_feature_lengths(task_feature_lengths)["decoder_target_tokens"]

        def convert(ex):
            inputs = tf.cast(ex["inputs"], tf.int32)
            targets = tf.cast(ex["targets"], tf.int32)
            n_in, n_tg = tf.size(inputs), tf.size(targets)
            sequence = tf.concat([inputs, targets], axis=0)
            shifted = tf.concat([[self.bos_id], sequence[:-1]], axis=0)
            weights = tf.concat([tf.zeros([n_in], tf.int32), tf.ones([n_tg], tf.int32)], axis=0)
            causal = tf.cast(tf.range(n_in + n_tg) <= n_in, tf.int32)

            def pad(x):
                return tf.pad(x, [[0, length - tf.size(x)]])
            return {
                "decoder_input_tokens": pad(shifted),
                "decoder_target_tokens": pad(sequence),
                "decoder_loss_weights": pad(weights),
                "decoder_causal_attention": pad(causal),
            }

        ds = ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.map(lambda ex: {k: tf.ensure_shape(v, [length]) for k, v in ex.items()})

    def get_model_feature_lengths(self, task_feature_lengths):
        length = task_feature_lengths["inputs"] + task_feature_lengths["targets"]
        return {k: length for k in self.MODEL_FEATURES}


class AudioFeatureConverter(seqio.FeatureConverter):
    """{'audio': float32 [samples]} -> {'audio': float32 [samples]} zero-padded to the requested length."""

    TASK_FEATURES = {"audio": Spec(dtype=tf.float32)}
    MODEL_FEATURES = {"audio": Spec(dtype=tf.float32)}
    PACKING_FEATURE_DTYPES = {}

    def __init__(self, pack: bool = False, **kwargs):
        if pack:
            raise ValueError("AudioFeatureConverter does not pack")
        super().__init__(pack=False, **kwargs)

    def _convert_features(self, ds, task_feature_lengths):
        length = task_feature_lengths["audio"]
        return ds.map(lambda ex: {"audio": tf.ensure_shape(
            tf.pad(ex["audio"], [[0, length - tf.shape(ex["audio"])[0]]]), [length])},
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def get_model_feature_lengths(self, task_feature_lengths):
        return {"audio": task_feature_lengths["audio"]}


class AudioTextFeatureConverter(seqio.FeatureConverter):
    """{'audio': float32 [samples], 'text': string} -> {'audio': float32 [audio length] (zero-padded),
    'text_tokens': int32 [text length]}: the caption tokenized with the SentencePiece model at
    `vocabulary_path`, truncated, padded with 0 (MuLan's contrastive batches)."""

    TASK_FEATURES = {"audio": Spec(dtype=tf.float32), "text": Spec(dtype=tf.string, rank=0)}
    MODEL_FEATURES = {"audio": Spec(dtype=tf.float32), "text_tokens": Spec(dtype=tf.int32)}
    PACKING_FEATURE_DTYPES = {}

    def __init__(self, vocabulary_path: str = "", pack: bool = False, **kwargs):
        if pack:
            raise ValueError("AudioTextFeatureConverter does not pack")
        if not vocabulary_path or not tf.io.gfile.exists(vocabulary_path):
            raise FileNotFoundError(f"AudioTextFeatureConverter: vocabulary_path={vocabulary_path!r} does not exist")
        self.vocabulary = seqio.SentencePieceVocabulary(vocabulary_path)
        super().__init__(pack=False, **kwargs)

    def _convert_features(self, ds, task_feature_lengths):
        audio_length, text_length = task_feature_lengths["audio"], task_feature_lengths["text"]

        def convert(ex):
            ids = tf.cast(self.vocabulary.encode_tf(ex["text"]), tf.int32)[:text_length]
            audio = ex["audio"]
            return {"audio": tf.ensure_shape(tf.pad(audio, [[0, audio_length - tf.shape(audio)[0]]]), [audio_length]),
                    "text_tokens": tf.ensure_shape(tf.pad(ids, [[0, text_length - tf.size(ids)]]), [text_length])}
        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def get_model_feature_lengths(self, task_feature_lengths):
        return {"audio": task_feature_lengths["audio"], "text_tokens": task_feature_lengths["text"]}


FEATURE_CONVERTERS = {"prefix_lm": PrefixLMFeatureConverter, "audio": AudioFeatureConverter,
                      "audio_text": AudioTextFeatureConverter}


def get(name: str, **kwargs) -> seqio.FeatureConverter:
    """A feature converter by the name a model declares (BaseModel.feature_converter_name), built with the
    model's feature_converter_kwargs (e.g. MuLan's vocabulary_path)."""
    if name not in FEATURE_CONVERTERS:
        raise KeyError(f"unknown feature converter {name!r}; known: {sorted(FEATURE_CONVERTERS)}")
    return FEATURE_CONVERTERS[name](**kwargs)
