"""Per-chip memory of the paper semantic stage's train step on TPU pods, compiled on this CPU (needs libtpu).

    python benchmarks/aot_memory.py

Compiles the real train step of gin/stages/semantic_paper.gin (430M parameters, batch 256 x 762 tokens, bf16
compute, full remat, scanned layers) for v5e:4x4 with its FSDP mesh (fsdp=16) and, as the baseline in the same
run, with pure data parallelism (data=16: parameters and AdamW state replicated on every chip); then for
v5e:16x16 at a global batch of 2048 (fsdp=256). Prints one JSON line last with each report (see
musiclm_jax.aot) and `fsdp_vs_data_parallel_memory_ratio`.
"""
from __future__ import annotations

import json

import gin

from musiclm_jax import aot, gin_utils, partitioning

GIN = "gin/stages/semantic_paper.gin"
ARGS = ("model", "optimizer", "train_dataset_cfg", "logical_axis_rules", "num_microbatches")


def compile_paper(topology: str, ici: dict, batch_size: int) -> dict:
    gin_utils.parse_gin([GIN], [f"TOKEN_DIR = '{aot.planned_token_dir('paper')}'"], finalize=False)
    args = gin_utils.bound_arguments("train", ARGS, {"logical_axis_rules": None, "num_microbatches": 1})
    gin.clear_config()
    return aot.compile_for_topology(model=args["model"], optimizer=args["optimizer"], batch_size=batch_size,
                                    mesh_config=partitioning.MeshConfig(ici_parallelism=ici),
                                    logical_axis_rules=args["logical_axis_rules"],
                                    num_microbatches=args["num_microbatches"], topology=topology)


def main():
    from musiclm_jax import train  # noqa: F401  (the run file binds train_lib.train)
    fsdp = compile_paper("v5e:4x4", {"data": 1, "fsdp": -1, "model": 1}, 256)
    data_parallel = compile_paper("v5e:4x4", {"data": -1, "fsdp": 1, "model": 1}, 256)
    pod = compile_paper("v5e:16x16", {"data": 1, "fsdp": -1, "model": 1}, 2048)
    summary = {
        "benchmark": "aot_memory",
        "v5e_4x4_fsdp_per_chip_gib": fsdp["per_chip_bytes"] / 2**30,
        "v5e_4x4_fsdp_headroom": fsdp["headroom"],
        "v5e_4x4_data_parallel_per_chip_gib": data_parallel["per_chip_bytes"] / 2**30,
        "v5e_4x4_data_parallel_fits": data_parallel["fits"],
        "fsdp_vs_data_parallel_memory_ratio": fsdp["per_chip_bytes"] / data_parallel["per_chip_bytes"],
        "v5e_16x16_batch2048_per_chip_gib": pod["per_chip_bytes"] / 2**30,
        "v5e_16x16_headroom": pod["headroom"],
        "reports": {"v5e_4x4_fsdp": fsdp, "v5e_4x4_data_parallel": data_parallel, "v5e_16x16_fsdp": pod},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
