"""Same-machine baseline: audiolm-pytorch 2.4.0 SemanticTransformer / SoundStream on CPU.

Measures the peer PyTorch implementation (lucidrains' audiolm-pytorch) so our
JAX benchmarks can print a baseline taken on the same machine in the same run.
`--model semantic` (the default) measures the SemanticTransformer:

  * a training step: SemanticTransformerWrapper(..., return_loss=True) forward
    on a 4 x 512 batch of random token ids, backward, AdamW step (lr 3e-4);
  * KV-cached generation of 512 new tokens after a 1-token prompt, batch 1,
    temperature (Gumbel) sampling, no conditioning;
  * torch fp32 matmul throughput (2048 x 2048 @ 2048 x 2048).

The last line printed is one JSON object with the keys
peer, peer_version, params, train_step_s_median, train_tokens_per_s,
generate_s_median, generate_tokens_per_s, torch_matmul_peak_gflops.

`--model soundstream` measures the SoundStream codec instead (see "SoundStream
mode" below); its last line is one JSON object with the keys
peer, peer_version, model, generator_params, discriminator_params,
encode_decode_s_median, codec_seconds_per_audio_second, train_step_s_median,
peak_rss_gib, torch_threads.

Both modes run with torch.set_num_threads(2).

This script runs under its own virtual environment (it imports torch,
audiolm_pytorch and, for one config object, transformers, a dependency of
audiolm_pytorch), never under the project's .venv. Setup that worked
(Python 3.11, CPU only, PyPI reachable, local CPU torch wheel):

    python3 -m venv /tmp/peer_venv
    /tmp/peer_venv/bin/pip install torch==2.13.0        # local +cpu build; FIRST
    /tmp/peer_venv/bin/pip install --no-deps audiolm-pytorch==2.4.0 torchaudio==2.11.0
    /tmp/peer_venv/bin/pip install accelerate beartype einops ema-pytorch \
        encodec wandb gateloop-transformer hyper-connections joblib \
        local-attention pytorch-warmup scikit-learn sentencepiece \
        transformers tqdm vector-quantize-pytorch numpy packaging
    # PyPI's torchaudio 2.11.0 wheel is a CUDA build: its native extension
    # needs libc10_cuda.so. torchaudio runs without the extension when the
    # .so files are absent (only pure-torch functions such as resample are
    # needed here), so remove them:
    rm /tmp/peer_venv/lib/python3.11/site-packages/torchaudio/lib/*.so
    # audiolm_pytorch imports fairseq at module level (only used for
    # HuBERT / vq-wav2vec feature extraction, never by this benchmark).
    # fairseq 0.12.2 does not import on Python 3.11; the "fairseq-fixed"
    # fork (installs the `fairseq` package) does. Build it against the
    # venv's torch so no CUDA torch is pulled into an isolated build env:
    /tmp/peer_venv/bin/pip install cython setuptools wheel cffi \
        hydra-core==1.3.2 omegaconf==2.3.0 bitarray sacrebleu
    /tmp/peer_venv/bin/pip install --no-deps --no-build-isolation fairseq-fixed==0.12.3.1
    /tmp/peer_venv/bin/python -c "from audiolm_pytorch import SemanticTransformer"

Run:

    /tmp/peer_venv/bin/python benchmarks/peer_audiolm.py [--steps 5] \
        [--model {semantic,soundstream}]

Notes on how the peer API is driven (audiolm-pytorch 2.4.0):

  * SemanticTransformer.forward(return_loss=True) only shifts the ids and
    returns logits; the loss is computed by SemanticTransformerWrapper, which
    is what the peer's own trainer calls, so the training step goes through
    the wrapper (defaults: appends EOS, unique_consecutive=True,
    mask_prob=0.15 self-attention masking while training).
  * SemanticTransformer has no `generate`; SemanticTransformerWrapper.generate
    does (arguments: max_length = total length including the prompt,
    prime_ids, temperature, filter_thres (top-k), use_kv_cache, cond_scale).
    With a 1-token prompt, max_length=513 yields 512 new tokens.
  * generate stops early once every row has sampled EOS. An untrained model
    samples EOS within a few hundred steps, so the EOS logit bias is set to a
    large negative value to force exactly 512 sampled tokens (this changes
    no shapes or FLOPs).
  * The constructor calls T5Config.from_pretrained('google/t5-v1_1-base')
    just to read d_model (it sizes proj_text_embed, a 768 -> 512 projection
    that is unused without text conditioning). Hugging Face is unreachable
    here, so the peer's config cache (audiolm_pytorch.t5.T5_CONFIGS) is seeded
    with T5Config(d_model=768) first; the model is then exactly the default
    one, and the reported parameter count includes that unused projection.

SoundStream mode (audiolm-pytorch 2.4.0 `SoundStream`):

  * Model: SoundStream(codebook_size=1024, rq_num_quantizers=8,
    strides=(2, 4, 5, 8), channels=32, target_sample_hz=24000), every other
    argument at its 2.4.0 default (channel_mults (2, 4, 8, 16),
    codebook_dim 512, causal local-attention transformer (window 128, depth
    1) after the encoder and before the decoder, GroupedResidualVQ with
    kmeans_init, EMA codebooks (decay 0.95), dead-code replacement
    (threshold 2), quantize dropout and the rotation trick; three
    multi-scale waveform discriminators (scales 1, 0.5, 0.25) plus the
    complex STFT discriminator; multi-spectral mel loss over windows
    2^6 .. 2^11). Hop = 2*4*5*8 = 320 samples, i.e. 75 frames/s at 24 kHz.
  * generator_params = sum over SoundStream.non_discr_parameters() (encoder,
    decoder, both local-attention blocks, both FiLM layers, rq), i.e. what
    the peer trainer's generator optimizer updates; about 18.1M. The RVQ
    codebooks (8 x 1024 x 512 = 4.19M values) are EMA *buffers* in
    vector-quantize-pytorch, not parameters, so they are not counted.
    discriminator_params = the three multi-scale discriminators plus the
    STFT discriminator. The two add up to sum(model.parameters()).
  * encode_decode_s: model.eval(), torch.no_grad(); codes =
    model.tokenize(audio) (encoder, local attention, RVQ -> int codes of
    shape (groups=1, batch, frames, quantizers)), then
    model.decode_from_codebook_indices(codes) (codebook lookup, local
    attention, decoder) for batch 1 x 240000 random samples (10 s at
    24 kHz -> 750 frames x 8 codes -> 240000 samples). Warm-up 1 (the first
    forward also runs the RVQ's one-off k-means codebook init), then
    `--steps` timed repeats; the median is reported, and
    codec_seconds_per_audio_second = median / 10.
  * train_step_s: one generator + discriminator step the way
    SoundStreamTrainer.train_step does it, on a batch of 2 x 24000 random
    samples (2 x 1 s), model in train mode:
      - generator: loss, breakdown = model(wave, return_loss_breakdown=True);
        loss.backward(); clip_grad_norm_(model.parameters(), 0.5) (the
        trainer's default max_grad_norm); Adam step over
        non_discr_parameters(); zero_grad;
      - discriminators: zero the STFT-discriminator and the three
        multi-scale discriminator optimizers' grads (this drops the grads
        the generator loss left on the discriminators, as the trainer does),
        losses = model(wave, return_discr_loss=True,
        return_discr_losses_separately=True), backward each loss with
        retain_graph=True, then step the STFT-discriminator Adam and each
        multi-scale discriminator's Adam.
    Optimizers as the trainer builds them with its defaults (lr 2e-4,
    wd 0 -> get_optimizer returns torch.optim.Adam, betas (0.9, 0.99),
    eps 1e-8). Differences from the trainer, all deliberate: one micro-batch
    per step (grad_accum_every=1 instead of the trainer's default 4; the
    same batch is used for the generator and discriminator halves), no
    accelerate wrapper (on CPU in fp32 its autocast is a no-op), no LR
    warmup scheduler (it only rescales lr), no EMA generator copy (the
    trainer updates it only after step 500, every 10 steps), no loss
    logging/.item() syncs, and apply_grad_penalty=False: the trainer adds
    gradient penalties (double backward) on every 4th step only
    (apply_grad_penalty_every=4), so this measures the common step.
    Quantize dropout (a random number of the 8 quantizers kept while
    training) is active as in real training; torch.manual_seed(0) fixes
    its draws. Warm-up 1 step (includes the k-means init if it has not run
    yet and Adam state allocation), then `--steps` timed steps; median.
  * peak_rss_gib: resource.getrusage(RUSAGE_SELF).ru_maxrss (KiB on Linux)
    / 2**20 at the end of the run, i.e. the process high-water mark over
    model construction, the encode/decode runs and the training steps.
  * Noise: with 2 torch threads on a 2-core machine, any other process
    busy on a core stalls torch's parallel regions, and timings inflate by
    far more than 2x (seen: encode+decode 7.4 s with 2 threads vs 3.0 s
    with 1 thread while another process held ~1 core; 2.1-2.3 s with 2
    threads when idle; single training steps from 11 s to 96 s). The text
    lines print every repeat and the min next to the median; check the
    loadavg lines before trusting a median.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # generate() wraps its loop in tqdm
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from audiolm_pytorch import SemanticTransformer, SemanticTransformerWrapper, SoundStream  # noqa: E402
from audiolm_pytorch.version import __version__ as PEER_VERSION  # noqa: E402
from audiolm_pytorch.t5 import DEFAULT_T5_NAME, T5_CONFIGS  # noqa: E402
from transformers import T5Config  # noqa: E402  (a dependency of audiolm_pytorch)

NUM_SEMANTIC_TOKENS = 1024
DIM = 512
DEPTH = 6
HEADS = 8

TRAIN_BATCH = 4
TRAIN_SEQ = 512
GEN_NEW_TOKENS = 512
MATMUL_N = 2048
T5_BASE_D_MODEL = 768  # d_model of google/t5-v1_1-base, the peer's default T5

# SoundStream mode
SS_CODEBOOK_SIZE = 1024
SS_NUM_QUANTIZERS = 8
SS_STRIDES = (2, 4, 5, 8)
SS_CHANNELS = 32
SS_SAMPLE_HZ = 24000
SS_CODEC_SECONDS = 10            # encode+decode: batch 1 x 10 s
SS_TRAIN_BATCH = 2               # training: batch 2 x 1 s
SS_TRAIN_SECONDS = 1
SS_LR = 2e-4                     # SoundStreamTrainer defaults: lr 2e-4, wd 0 -> Adam
SS_ADAM_BETAS = (0.9, 0.99)      # audiolm_pytorch.optimizer.get_optimizer defaults
SS_MAX_GRAD_NORM = 0.5           # SoundStreamTrainer default max_grad_norm


def timed(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def build_model() -> tuple[SemanticTransformer, SemanticTransformerWrapper]:
    # The constructor asks for the T5 encoder's width (to size an unused text
    # projection) via T5Config.from_pretrained, i.e. a Hugging Face download.
    # Seed the peer's own config cache with that value instead (see docstring).
    T5_CONFIGS.setdefault(DEFAULT_T5_NAME, {"config": T5Config(d_model=T5_BASE_D_MODEL)})
    model = SemanticTransformer(
        num_semantic_tokens=NUM_SEMANTIC_TOKENS,
        dim=DIM,
        depth=DEPTH,
        heads=HEADS,
    )
    wrapper = SemanticTransformerWrapper(transformer=model)  # no wav2vec
    return model, wrapper


def bench_train(wrapper: SemanticTransformerWrapper, steps: int) -> list[float]:
    wrapper.train()
    opt = torch.optim.AdamW(wrapper.parameters(), lr=3e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, NUM_SEMANTIC_TOKENS, (TRAIN_BATCH, TRAIN_SEQ), generator=gen)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = wrapper(semantic_token_ids=ids, return_loss=True)
        loss.backward()
        opt.step()
        return loss

    return timed(step, warmup=2, repeats=steps)


def bench_generate(model: SemanticTransformer, wrapper: SemanticTransformerWrapper,
                   steps: int) -> list[float]:
    with torch.no_grad():
        model.to_logits.bias[model.eos_id] = -1e4  # never sample EOS
    prime = torch.randint(0, NUM_SEMANTIC_TOKENS, (1, 1))

    def gen():
        out = wrapper.generate(
            max_length=1 + GEN_NEW_TOKENS,
            prime_ids=prime,
            batch_size=1,
            temperature=1.0,
            use_kv_cache=True,
        )
        assert out.shape == (1, 1 + GEN_NEW_TOKENS), out.shape
        assert bool((out >= 0).all()), "EOS / padding in the generated ids"
        return out

    return timed(gen, warmup=1, repeats=steps)


def bench_matmul(repeats: int = 10) -> float:
    a = torch.randn(MATMUL_N, MATMUL_N, dtype=torch.float32)
    b = torch.randn(MATMUL_N, MATMUL_N, dtype=torch.float32)
    times = timed(lambda: torch.mm(a, b), warmup=2, repeats=repeats)
    return 2 * MATMUL_N**3 / statistics.median(times) / 1e9


def build_soundstream() -> SoundStream:
    return SoundStream(
        codebook_size=SS_CODEBOOK_SIZE,
        rq_num_quantizers=SS_NUM_QUANTIZERS,
        strides=SS_STRIDES,
        channels=SS_CHANNELS,
        target_sample_hz=SS_SAMPLE_HZ,
    )


def discriminator_modules(model: SoundStream) -> list[torch.nn.Module]:
    return [*model.discriminators, model.stft_discriminator]


def bench_soundstream_codec(model: SoundStream, steps: int) -> list[float]:
    model.eval()
    gen = torch.Generator().manual_seed(1)
    n = SS_CODEC_SECONDS * SS_SAMPLE_HZ
    audio = torch.rand((1, n), generator=gen) * 2 - 1
    frames = n // model.seq_len_multiple_of

    def encode_decode():
        with torch.no_grad():
            codes = model.tokenize(audio)  # (groups, batch, frames, quantizers)
            recon = model.decode_from_codebook_indices(codes)
        assert codes.shape == (1, 1, frames, SS_NUM_QUANTIZERS), codes.shape
        assert recon.shape == (1, 1, n), recon.shape
        return recon

    return timed(encode_decode, warmup=1, repeats=steps)


def bench_soundstream_train(model: SoundStream, steps: int) -> list[float]:
    model.train()
    adam = dict(lr=SS_LR, betas=SS_ADAM_BETAS, eps=1e-8)
    gen_opt = torch.optim.Adam(model.non_discr_parameters(), **adam)
    discr_opts = [torch.optim.Adam(d.parameters(), **adam) for d in discriminator_modules(model)]
    gen = torch.Generator().manual_seed(2)
    wave = torch.rand((SS_TRAIN_BATCH, SS_TRAIN_SECONDS * SS_SAMPLE_HZ), generator=gen) * 2 - 1

    def step():
        # generator (SoundStreamTrainer.train_step, first half)
        loss, _breakdown = model(wave, return_loss_breakdown=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), SS_MAX_GRAD_NORM)
        gen_opt.step()
        gen_opt.zero_grad()
        # discriminators (second half)
        for opt in discr_opts:
            opt.zero_grad()
        discr_losses = model(wave, apply_grad_penalty=False, return_discr_loss=True,
                             return_discr_losses_separately=True)
        for _name, discr_loss in discr_losses:
            discr_loss.backward(retain_graph=True)
        for opt in discr_opts:
            opt.step()
        return loss

    return timed(step, warmup=1, repeats=steps)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def fmt_times(times: list[float]) -> str:
    return (", ".join(f"{t:.3f}" for t in times)
            + f" s; min {min(times):.3f} s, median {statistics.median(times):.3f} s")


def main_soundstream(args: argparse.Namespace) -> None:
    model = build_soundstream()
    generator_params = sum(p.numel() for p in model.non_discr_parameters())
    discriminator_params = sum(p.numel() for d in discriminator_modules(model) for p in d.parameters())
    assert generator_params + discriminator_params == sum(p.numel() for p in model.parameters())
    print(f"audiolm-pytorch {PEER_VERSION}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"SoundStream generator params: {generator_params:,}; "
          f"discriminator params: {discriminator_params:,} "
          f"(RVQ codebooks are buffers: {SS_NUM_QUANTIZERS} x {SS_CODEBOOK_SIZE} x {model.codebook_dim})")

    codec_times = bench_soundstream_codec(model, args.steps)
    codec_s = statistics.median(codec_times)
    print(f"encode+decode {SS_CODEC_SECONDS} s (batch 1, {SS_CODEC_SECONDS * SS_SAMPLE_HZ} samples): "
          + fmt_times(codec_times)
          + f"; {codec_s / SS_CODEC_SECONDS:.4f} codec s per audio s")

    train_times = bench_soundstream_train(model, args.steps)
    train_s = statistics.median(train_times)
    print(f"train step (gen + discr, {SS_TRAIN_BATCH} x {SS_TRAIN_SECONDS} s): " + fmt_times(train_times))

    rss = peak_rss_gib()
    print(f"peak RSS: {rss:.2f} GiB")
    print(f"loadavg at end: {load_average()}  (other processes on the machine skew timings)")

    print(json.dumps({
        "peer": "audiolm-pytorch",
        "peer_version": PEER_VERSION,
        "model": "soundstream",
        "generator_params": generator_params,
        "discriminator_params": discriminator_params,
        "encode_decode_s_median": round(codec_s, 4),
        "codec_seconds_per_audio_second": round(codec_s / SS_CODEC_SECONDS, 4),
        "train_step_s_median": round(train_s, 4),
        "peak_rss_gib": round(rss, 3),
        "torch_threads": torch.get_num_threads(),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed repeats")
    parser.add_argument("--model", choices=("semantic", "soundstream"), default="semantic",
                        help="which peer model to measure (default: semantic)")
    args = parser.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"loadavg at start: {load_average()}")

    if args.model == "soundstream":
        main_soundstream(args)
        return

    model, wrapper = build_model()
    params = sum(p.numel() for p in model.parameters())
    print(f"audiolm-pytorch {PEER_VERSION}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    unused = sum(p.numel() for p in model.proj_text_embed.parameters())
    print(f"SemanticTransformer params: {params:,} "
          f"(incl. {unused:,} in the unused text projection)")

    train_times = bench_train(wrapper, args.steps)
    train_s = statistics.median(train_times)
    print(f"train step ({TRAIN_BATCH}x{TRAIN_SEQ}): "
          + ", ".join(f"{t:.3f}" for t in train_times)
          + f" s; min {min(train_times):.3f} s, median {train_s:.3f} s, "
          f"{TRAIN_BATCH * TRAIN_SEQ / train_s:.1f} tokens/s")

    gen_times = bench_generate(model, wrapper, args.steps)
    gen_s = statistics.median(gen_times)
    print(f"generate {GEN_NEW_TOKENS} tokens (batch 1, kv cache): "
          + ", ".join(f"{t:.3f}" for t in gen_times)
          + f" s; min {min(gen_times):.3f} s, median {gen_s:.3f} s, {GEN_NEW_TOKENS / gen_s:.1f} tokens/s")

    gflops = bench_matmul()
    print(f"torch fp32 matmul {MATMUL_N}^3: {gflops:.1f} GFLOP/s")
    print(f"loadavg at end: {load_average()}  (other processes on the machine skew timings)")

    print(json.dumps({
        "peer": "audiolm-pytorch",
        "peer_version": PEER_VERSION,
        "params": params,
        "train_step_s_median": round(train_s, 4),
        "train_tokens_per_s": round(TRAIN_BATCH * TRAIN_SEQ / train_s, 2),
        "generate_s_median": round(gen_s, 4),
        "generate_tokens_per_s": round(GEN_NEW_TOKENS / gen_s, 2),
        "torch_matmul_peak_gflops": round(gflops, 2),
    }))


if __name__ == "__main__":
    main()
