"""Same-machine baseline: audiolm-pytorch 2.4.0 SemanticTransformer on CPU.

Measures the peer PyTorch implementation (lucidrains' audiolm-pytorch) so our
JAX benchmarks can print a baseline taken on the same machine in the same run:

  * a training step: SemanticTransformerWrapper(..., return_loss=True) forward
    on a 4 x 512 batch of random token ids, backward, AdamW step (lr 3e-4);
  * KV-cached generation of 512 new tokens after a 1-token prompt, batch 1,
    temperature (Gumbel) sampling, no conditioning;
  * torch fp32 matmul throughput (2048 x 2048 @ 2048 x 2048).

The last line printed is one JSON object with the keys
peer, peer_version, params, train_step_s_median, train_tokens_per_s,
generate_s_median, generate_tokens_per_s, torch_matmul_peak_gflops.

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

    /tmp/peer_venv/bin/python benchmarks/peer_audiolm.py [--steps 5]

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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # generate() wraps its loop in tqdm
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from audiolm_pytorch import SemanticTransformer, SemanticTransformerWrapper  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed repeats")
    args = parser.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"loadavg at start: {load_average()}")

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
          + f" s; min {min(train_times):.3f} s, median {train_s:.3f} s, {TRAIN_BATCH * TRAIN_SEQ / train_s:.1f} tokens/s")

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
