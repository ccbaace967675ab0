"""Mini-batch k-means: quality against scikit-learn, the Sculley update by hand, dead centres, a (2, 4) mesh
against one device, resumption, input errors."""
import functools

import jax
import numpy as np
import pytest
from sklearn.cluster import KMeans

from helpers import mesh
from musiclm_jax import partitioning
from musiclm_jax import kmeans

K, DIM = 32, 16


@functools.lru_cache(maxsize=None)
def blobs(n: int = 20480, seed: int = 0) -> np.ndarray:
    """n points [n, DIM] f32 from K Gaussian blobs of different widths."""
    rng = np.random.RandomState(seed)
    centers = rng.uniform(-3.0, 3.0, (K, DIM))
    scales = rng.uniform(0.5, 1.5, K)
    labels = rng.randint(K, size=n)
    return (centers[labels] + scales[labels, None] * rng.randn(n, DIM)).astype(np.float32)


def batches(x: np.ndarray, batch: int, seed: int = 0):
    """Endless shuffled epochs of x in batches [batch, DIM]."""
    rng = np.random.RandomState(seed)
    while True:
        order = rng.permutation(len(x))
        for start in range(0, len(x) - batch + 1, batch):
            yield x[order[start:start + batch]]


def one_device() -> partitioning.Partitioner:
    return partitioning.Partitioner(mesh(1, 1, devices=jax.devices()[:1]))


def test_inertia_within_5_percent_of_sklearn():
    x = blobs()
    model = kmeans.MiniBatchKMeans(K, DIM, seed=0)  # all 8 devices on 'data'
    history = model.fit(batches(x, 1024), num_steps=200)
    ours = float(kmeans.inertia(model.centroids, x))
    theirs = KMeans(n_clusters=K, n_init=3, random_state=0).fit(x).inertia_
    print(f"inertia: mini-batch k-means {ours:.1f}, sklearn KMeans {theirs:.1f}, ratio {ours / theirs:.4f}; "
          f"batch inertia {history[0]['inertia']:.3f} -> {history[-1]['inertia']:.3f}")
    assert ours <= 1.05 * theirs
    assert history[-1]["step"] == 200


def test_update_matches_sculley_by_hand():
    centroids = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
    counts = np.array([2.0, 1.0, 5.0], np.float32)
    state = kmeans.KMeansState(centroids, counts, np.int32(3), np.bool_(True))
    points = np.array([[1.0, 1.0], [-1.0, 0.0], [9.0, 1.0], [2.0, 0.5]], np.float32)
    ids, d2 = kmeans.assign(centroids, points)
    np.testing.assert_array_equal(ids, [0, 0, 1, 0])
    np.testing.assert_allclose(d2, [2.0, 1.0, 2.0, 4.25], rtol=1e-6)
    new, metrics = kmeans.update(state, points, jax.random.key(0), reseed_every=0)
    # Centre 0: 3 new points, count 5, lr 1/count: c += (sum - 3c) / 5; centre 1: count 2; centre 2 unchanged.
    np.testing.assert_allclose(new.counts, [5.0, 2.0, 5.0])
    np.testing.assert_allclose(new.centroids, [[2.0 / 5, 1.5 / 5], [10.0 - 0.5, 0.5], [0.0, 10.0]], rtol=1e-6)
    assert int(new.step) == 4 and int(metrics["empty"]) == 1
    np.testing.assert_allclose(metrics["inertia"], 9.25 / 4, rtol=1e-6)
    np.testing.assert_allclose(kmeans.inertia(centroids, points), 9.25, rtol=1e-6)


def test_first_update_seeds_with_kmeans_plus_plus_and_dead_centres_are_reseeded():
    x = blobs(2048, seed=1)
    seeded = kmeans.kmeans_plus_plus(jax.random.key(3), x, K)
    rows = {tuple(r) for r in x}
    assert all(tuple(c) in rows for c in np.asarray(seeded)) and len({tuple(c) for c in np.asarray(seeded)}) == K
    state, _ = kmeans.update(kmeans.init_state(K, DIM), x, jax.random.key(3))
    assert bool(state.initialized) and float(state.counts.sum()) == len(x)
    # Centre 5 far from everything (never assigned): dead at the next multiple of reseed_every.
    far = state.replace(centroids=state.centroids.at[5].set(1e3), counts=state.counts.at[5].set(0.0), step=9)
    new, metrics = kmeans.update(far, x, jax.random.key(4), reseed_every=10)
    assert int(metrics["reseeded"]) == 1 and tuple(np.asarray(new.centroids[5])) in rows
    live = np.delete(np.asarray(new.counts), 5)
    assert float(new.counts[5]) == live.min()
    np.testing.assert_array_equal(np.delete(np.asarray(new.centroids), 5, 0),
                                  np.delete(np.asarray(kmeans.update(far, x, jax.random.key(4),
                                                                     reseed_every=0)[0].centroids), 5, 0))


def test_identical_on_a_2x4_mesh_and_one_device():
    x = blobs()
    data = [x[i * 512:(i + 1) * 512] for i in range(20)]
    options = dict(seed=1, reseed_every=5, reseed_ratio=0.5)  # a high ratio, so that re-seeding happens
    single = kmeans.MiniBatchKMeans(K, DIM, partitioner=one_device(), **options)
    reseeded = sum(m["reseeded"] for m in single.fit(data))
    assert reseeded > 0
    sharded = kmeans.MiniBatchKMeans(K, DIM, partitioner=partitioning.Partitioner(mesh(2, 4)), **options)
    points = sharded.shard(data[0])
    assert points.sharding.shard_shape(points.shape) == (256, DIM)  # split over data=2, replicated over model
    with sharded.partitioner.activate():
        hlo = sharded._step.lower(sharded.state, points, sharded._key).compile().as_text()
    assert "all-reduce" in hlo  # the per-centre sums are reduced across the data axis
    sharded.fit(data)
    diff = np.abs(sharded.centroids - single.centroids).max()
    print(f"(2, 4) mesh vs one device: max |centroid difference| {diff:.2e}, "
          f"{reseeded} centres re-seeded")
    np.testing.assert_allclose(sharded.centroids, single.centroids, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(sharded.state_dict()["counts"], single.state_dict()["counts"])
    np.testing.assert_array_equal(sharded.predict(x), single.predict(x))


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    stream = batches(blobs(), 256, seed=2)
    data = [next(stream) for _ in range(20)]
    make = functools.partial(kmeans.MiniBatchKMeans, K, DIM, seed=5, reseed_every=3)
    straight = make()
    straight.fit(data)
    first = make()
    first.fit(data[:10])
    first.save(str(tmp_path / "kmeans.npz"))
    resumed = make(seed=0)  # the seed comes back from the file
    resumed.restore(str(tmp_path / "kmeans.npz"))
    assert resumed.seed == 5 and int(resumed.state.step) == 10
    resumed.fit(data[10:])
    for name, value in straight.state_dict().items():
        np.testing.assert_allclose(resumed.state_dict()[name], value, rtol=1e-6, atol=1e-6, err_msg=name)


def test_bad_batches_raise_clear_errors():
    model = kmeans.MiniBatchKMeans(K, DIM, partitioner=partitioning.Partitioner(mesh(2, 4)))
    with pytest.raises(partitioning.MeshShapeError, match=r"batch size \(points.shape\[0\]\)=1001 .*size 2"):
        model.step(np.zeros((1001, DIM), np.float32))
    with pytest.raises(ValueError, match=r"shape \(64, 8\); expected \[batch, 16\]"):
        model.step(np.zeros((64, 8), np.float32))
    with pytest.raises(ValueError, match=r"needs >= k=32 points, got batch size 16"):
        model.step(np.zeros((16, DIM), np.float32))
    with pytest.raises(ValueError, match=r"expected \[batch, 16\]"):
        kmeans.update(kmeans.init_state(K, DIM), np.zeros((64, 15), np.float32), jax.random.key(0))
