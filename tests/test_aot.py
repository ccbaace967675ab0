"""AOT compile of the real train step for TPU topologies, on this CPU (needs the `tpu` extra: libtpu)."""
import gin
import pytest

from helpers import planned_token_dir
from musiclm_jax import aot, partitioning

KEYS = {"topology", "num_chips", "per_chip_bytes", "hbm_bytes_per_chip", "fits", "params", "model_flops_per_chip",
        "min_step_seconds", "largest_replicated_param_bytes"}


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()


def test_tiny_semantic_stage_on_v5e_2x2():
    report = aot.main(["--gin_file=gin/stages/semantic_synthetic.gin", "--topology=v5e:2x2"])
    assert KEYS <= set(report)
    assert report["num_chips"] == 4 and report["mesh"] == {"data": 4, "fsdp": 1, "model": 1}
    assert report["fits"] and report["per_chip_bytes"] > 0
    # Analytic FLOPs: 6 * matmul params * tokens + 12 * layers * heads * head_dim * length per token.
    d, layers, heads, head_dim, mlp, vocab, length, batch = 64, 2, 4, 16, 256, 512, 44, 32
    matmul = layers * (4 * d * heads * head_dim + 3 * d * mlp) + d * vocab
    per_token = 6 * matmul + 12 * layers * heads * head_dim * length
    assert report["model_flops_per_chip"] == pytest.approx(per_token * length * batch / 4)
    assert report["min_step_seconds"] == pytest.approx(report["model_flops_per_chip"] / 197e12)


def test_v4_counts_chips_not_cores_and_model_parallel_mesh():
    report = aot.main(["--gin_file=gin/stages/semantic_synthetic.gin", "--topology=v4:2x2x1",
                       "--gin.ICI_PARALLELISM={'data': 4, 'fsdp': 1, 'model': 2}"])
    assert report["num_chips"] == 4 and report["num_devices"] == 8
    assert report["mesh"] == {"data": 4, "fsdp": 1, "model": 2}
    assert report["hbm_bytes_per_chip"] == 32 * 2**30


def test_mesh_that_does_not_fit_the_topology_is_an_error():
    with pytest.raises(partitioning.MeshShapeError, match="describes 3 devices but there are 4"):
        aot.main(["--gin_file=gin/stages/semantic_synthetic.gin", "--topology=v5e:2x2",
                  "--gin.ICI_PARALLELISM={'data': 3}"])
    with pytest.raises(ValueError, match="--topology='v9z:1x1'"):
        aot.main(["--gin_file=gin/stages/semantic_synthetic.gin", "--topology=v9z:1x1"])


def test_paper_semantic_stage_fits_16_v5e_chips_with_headroom():
    report = aot.main(["--gin_file=gin/stages/semantic_paper.gin", "--topology=v5e:4x4",
                       f"--gin.TOKEN_DIR='{planned_token_dir('paper')}'"])
    assert report["num_chips"] == 16 and report["batch_size"] == 256
    assert 420e6 < report["params"] < 440e6
    assert report["fits"] and report["per_chip_bytes"] <= 0.8 * 16 * 2**30, report
    assert report["largest_replicated_param_bytes"] <= 16 * 2**20


def test_tiny_w2v_bert_compiles_for_v5e_with_fsdp():
    # The paper config compiles too (README: w2v-BERT XL on v5e:16x16, 2.19 GB per chip) but takes 5 minutes on
    # this CPU; the tiny one checks the same sharding rules in 30 s. (The codec's convolutions take libtpu
    # minutes even at the tiny size, so its AOT figures are in the README, not in CI.)
    report = aot.main(["--gin_file=gin/w2v_bert/tiny.gin", "--topology=v5e:2x2",
                       "--gin.ICI_PARALLELISM={'data': 1, 'fsdp': 4, 'model': 1}"])
    assert report["mesh"] == {"data": 1, "fsdp": 4, "model": 1}
    assert report["fits"] and report["params"] > 0 and report["per_chip_bytes"] > 0


def test_tiny_mulan_compiles_for_v5e_with_fsdp():
    # gin/mulan/paper.gin (ResNet-50 + BERT-base, batch 2048) compiles for v5e:16x16 and fits at 3.58 GB per chip
    # (README), but libtpu takes 3.5 minutes on this CPU; the tiny model checks the towers' sharding rules.
    report = aot.main(["--gin_file=gin/mulan/tiny.gin", "--topology=v5e:2x2", "--gin.MODEL_DIR='/tmp/unused'",
                       "--gin.ICI_PARALLELISM={'data': 2, 'fsdp': 2, 'model': 1}"])
    assert report["mesh"] == {"data": 2, "fsdp": 2, "model": 1} and report["batch_size"] == 32
    assert report["fits"] and report["params"] > 0 and report["per_chip_bytes"] > 0


def test_two_compile_jobs_at_once_share_libtpu(tmp_path):
    # libtpu lets one process per host hold it (/tmp/libtpu_lockfile); describing a topology opens no chip, so
    # aot waives the lock: a second process describing a slice while this one holds libtpu must not fail
    # (pytest -n 2 runs test_aot and test_recipe's --aot in two workers at once).
    import os, subprocess, sys
    aot.topology_devices("v5e:2x2")  # this process now holds libtpu
    env = {k: v for k, v in os.environ.items() if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"}
    env["JAX_PLATFORMS"] = "cpu"
    other = subprocess.run([sys.executable, "-c", "from musiclm_jax import aot; "
                            "print(len(aot.topology_devices('v5e:2x2')))"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert other.returncode == 0, other.stderr[-2000:]
    assert other.stdout.split()[-1] == "4"


def test_tokenization_forward_compiles_for_v5e_with_its_floor():
    """--job=tokenize on gin/tokenize/aot_paper.gin with the demo's tiny tokenizers (the paper sizes take this
    CPU minutes; README has their figures): per-chip memory, FLOPs by tokenizer and the floor they imply."""
    report = aot.main(["--job=tokenize", "--gin_file=gin/tokenize/aot_paper.gin", "--topology=v5e:2x2",
                       "--gin.tokenize_forward.aot_setup.codec_gin='gin/models/codec_spectral_tiny.gin'",
                       "--gin.tokenize_forward.aot_setup.semantic_gin='gin/models/w2v_bert_tiny.gin'",
                       "--gin.tokenize_forward.aot_setup.semantic_fit_gin='gin/semantic/kmeans_tiny.gin'",
                       "--gin.tokenize_forward.aot_setup.mulan_gin='gin/models/mulan_tiny.gin'",
                       "--gin.tokenize_forward.aot_setup.mulan_rvq_codebook_size=32",
                       "--gin.tokenize_forward.aot_setup.chunk_seconds=4.0",
                       "--gin.tokenize_forward.aot_setup.batch_size=8"])
    assert report["job"] == "tokenize" and report["num_chips"] == 4 and report["mesh"]["data"] == 4
    assert report["inputs"] == {"16000Hz": [8, 64000], "24000Hz": [8, 96000]}
    assert report["fits"] and 0 < report["per_chip_bytes"] < 2**30
    flops = report["matmul_flops_per_chunk"]
    assert flops["codec"] + flops["semantic"] + flops["mulan"] == pytest.approx(flops["total"])
    assert report["min_batch_seconds"] == pytest.approx(flops["total"] * 8 / 4 / 197e12)
    assert report["dataset_floor_hours"] == pytest.approx(
        280000 * 3600 / (8 * 4.0 / report["min_batch_seconds"]) / 3600)
    with pytest.raises(partitioning.MeshShapeError, match="aot_setup.batch_size=6"):
        aot.main(["--job=tokenize", "--gin_file=gin/tokenize/aot_paper.gin", "--topology=v5e:2x2",
                  "--gin.tokenize_forward.aot_setup.batch_size=6"])
    with pytest.raises(Exception, match="--job='serve'"):
        aot.main(["--job=serve", "--gin_file=gin/tokenize/aot_paper.gin", "--topology=v5e:2x2"])
