"""k-means in JAX, mini-batch (Sculley 2010) and Lloyd's. The mini-batch fit gives the semantic tokenizer's
codebook (k=1024 centres of 768-1024-d w2v-BERT embeddings) in a job that streams embeddings batch by batch, on
all devices.

* `kmeans_plus_plus`: (greedy) k-means++ seeding; `lloyd`: Lloyd's iterations on one batch from it, the residual
  VQ's data-dependent codebook start (quantizers.py).
* `assign`, `inertia`: nearest centre and squared distance (vq.py: |x|^2 - 2 x.c + |c|^2 at HIGHEST precision). The
  [n, k] distance matrix is not chunked: each device holds [n / data-parallel size, k] of it.
* `update`: one step on a `KMeansState`. The first call seeds the centres by k-means++ on its batch; every call
  then applies Sculley's update with per-centre learning rate 1/count:
      counts += n_assigned;  centroid += (sum_assigned - n_assigned * centroid) / counts
  (a centre's first points set it to their mean), so each centre is the running mean of all points it was given.
* Dead centres: every `reseed_every` steps, a centre whose count is below `reseed_ratio * max(counts)` (it has
  captured almost nothing; scikit-learn's `reassignment_ratio`) moves onto a point of the current batch drawn
  without replacement with probability proportional to that point's squared distance to its nearest centre
  (D^2 sampling: points far from their centre are favoured), and its count becomes the smallest live count
  (as in scikit-learn, so that it is not judged dead again at once).
* `MiniBatchKMeans`: jits `update` with the batch sharded over the data axes (logical 'activation_batch' ->
  ('data', 'fsdp')) and the state replicated. Per-centre sums and counts are reductions over the global batch
  inside jit, which XLA all-reduces over the data axes: every device holds the same centres, equal (up to float
  summation order) to a one-device fit. Save / restore (npz) and `state_dict` for other checkpoints.
"""
from __future__ import annotations

import io
import itertools
import math
from typing import Any, Iterable, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import PartitionSpec

from musiclm_jax import partitioning
from musiclm_jax.vq import nearest_code, nearest_code_and_distance, squared_distances

HIGHEST = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class KMeansState:
    """centroids [k, dim] f32; counts [k] f32 (points assigned so far); step [] int32 (updates applied);
    initialized [] bool (k-means++ has seeded the centres)."""

    centroids: jax.Array
    counts: jax.Array
    step: jax.Array
    initialized: jax.Array


def init_state(k: int, dim: int) -> KMeansState:
    """An empty state of k centres in dim dimensions (seeded by the first `update`)."""
    return KMeansState(centroids=jnp.zeros((k, dim), jnp.float32), counts=jnp.zeros((k,), jnp.float32),
                       step=jnp.zeros((), jnp.int32), initialized=jnp.zeros((), jnp.bool_))


def assign(centroids: jax.Array, points: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nearest centre of each point: centroids [k, dim], points [n, dim] -> (ids [n] int32 (ties: lowest id),
    squared distances to it [n] f32) (vq.nearest_code_and_distance)."""
    return nearest_code_and_distance(points, centroids)


def inertia(centroids: jax.Array, points: jax.Array) -> jax.Array:
    """Sum over points [n, dim] of the squared distance to the nearest of centroids [k, dim] -> [] f32."""
    return jnp.sum(assign(centroids, points)[1])


def kmeans_plus_plus(rng: jax.Array, points: jax.Array, k: int, *, weights: Optional[jax.Array] = None,
                     n_local_trials: Optional[int] = None) -> jax.Array:
    """k-means++ seeding: k rows of points [n, dim] -> centroids [k, dim] f32.

    The first row is drawn with probability proportional to its weight, each next one proportional to
    weight * squared distance to the rows already chosen (rows of weight 0 are never drawn while others are
    left). Greedy variant (Arthur & Vassilvitskii; scikit-learn's default): draw `n_local_trials` candidates
    (default 2 + log k; 1 = plain k-means++) and keep the one that lowers the potential most. Draws are
    Gumbel-max / Gumbel-top-k, which involve no sums, so the choice is the same however `points` is sharded.

    Args:
      rng: the key; points: [n, dim]; k: number of centres (n < k repeats rows).
      weights: [n] non-negative row weights (default 1).
    """
    n = points.shape[0]
    x = jnp.asarray(points, jnp.float32)
    w = jnp.ones((n,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    trials = min(n, 2 + int(math.log(k)) if n_local_trials is None else n_local_trials)
    log_w = jnp.log(w)

    def draw(key, mass, num):  # num rows without replacement, P ~ mass (P ~ weight once all mass is 0)
        score = jnp.where(jnp.any(mass > 0), jnp.log(mass), log_w) + jax.random.gumbel(key, (n,))
        return jax.lax.top_k(score, num)[1]

    def distances(idx):  # [n, len(idx)]
        return squared_distances(x, x[idx])

    first = draw(jax.random.fold_in(rng, 0), jnp.zeros((n,), jnp.float32), 1)[0]
    d2 = distances(first[None])[:, 0].at[first].set(0.0)
    centroids = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(x[first])

    def add(i, carry):
        centroids, d2 = carry
        candidates = draw(jax.random.fold_in(rng, i), d2 * w, trials)  # [trials]
        dc = distances(candidates)  # [n, trials]
        if trials > 1:
            potential = jnp.sum(w[:, None] * jnp.minimum(d2[:, None], dc), axis=0)
            best = jnp.argmin(jnp.where(w[candidates] > 0, potential, jnp.inf))
        else:
            best = 0
        chosen = candidates[best]
        d2 = jnp.minimum(d2, dc[:, best]).at[chosen].set(0.0)
        return centroids.at[i].set(x[chosen]), d2

    centroids, _ = jax.lax.fori_loop(1, k, add, (centroids, d2))
    return centroids


def lloyd(x: jax.Array, k: int, iters: int, rng: jax.Array, weights: Optional[jax.Array] = None) -> tuple:
    """Lloyd's k-means on x [M, D] from a plain k-means++ start (rows with weight 0 ignored): the batch fit behind
    a codebook's data-dependent start (quantizers.ResidualVQ; the streaming fit of many batches is `update`).

    Returns (centroids [k, D], counts [k]); a centroid that loses all its points keeps its position.
    """
    weights = jnp.ones((x.shape[0],), jnp.float32) if weights is None else weights.astype(jnp.float32)
    centroids = kmeans_plus_plus(rng, x, k, weights=weights, n_local_trials=1)

    def step(centroids, _):
        assign = jax.nn.one_hot(nearest_code(x, centroids), k, dtype=jnp.float32) * weights[:, None]
        counts = jnp.sum(assign, axis=0)
        sums = assign.T @ x.astype(jnp.float32)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts[:, None], 1.0), centroids), None

    centroids, _ = jax.lax.scan(step, centroids, None, length=iters)
    counts = jnp.sum(jax.nn.one_hot(nearest_code(x, centroids), k, dtype=jnp.float32) * weights[:, None], axis=0)
    return centroids, counts


def update(state: KMeansState, points: jax.Array, rng: jax.Array, *, reseed_every: int = 10,
           reseed_ratio: float = 0.01, n_local_trials: Optional[int] = None) -> tuple[KMeansState, dict]:
    """One mini-batch step (see the module docstring for the rule).

    Args:
      state: from `init_state` or a previous update.
      points: the batch [n, dim] (the first one should hold >= k points).
      rng: key for the k-means++ seeding (first call) and the re-seeding of dead centres.
      reseed_every: check for dead centres every this many steps (0: never).
      reseed_ratio: a centre is dead when its count < reseed_ratio * max(counts).
      n_local_trials: greedy k-means++ candidates (see `kmeans_plus_plus`).
    Returns:
      (new state, metrics {'inertia': [] mean squared distance of the batch to the centres it was assigned to
       (after seeding, before the update), 'empty': [] centres assigned no point of this batch,
       'reseeded': [] dead centres moved, 'step': [] the new step}).
    Raises:
      ValueError if points is not [n, dim] with the state's dim.
    """
    k, dim = state.centroids.shape
    if points.ndim != 2 or points.shape[1] != dim:
        raise ValueError(f"k-means points have shape {tuple(points.shape)}; expected [batch, {dim}] (dim={dim})")
    n = points.shape[0]
    x = jnp.asarray(points, jnp.float32)
    init_key, reseed_key = jax.random.split(rng)
    centroids = jax.lax.cond(state.initialized, lambda: state.centroids,
                             lambda: kmeans_plus_plus(init_key, x, k, n_local_trials=n_local_trials))

    ids, d2 = assign(centroids, x)
    onehot = jax.nn.one_hot(ids, k, dtype=jnp.float32)  # [n, k]
    n_assigned = jnp.sum(onehot, axis=0)  # [k]: sums over the global batch
    sums = jnp.dot(onehot.T, x, precision=HIGHEST)  # [k, dim]
    counts = state.counts + n_assigned
    centroids = centroids + (sums - n_assigned[:, None] * centroids) / jnp.maximum(counts, 1.0)[:, None]
    step = state.step + 1

    dead = jnp.zeros((k,), jnp.bool_)
    if reseed_every > 0:
        slots = min(k, n)
        far = jax.lax.top_k(jnp.log(d2) + jax.random.gumbel(reseed_key, (n,)), slots)[1]  # D^2 sampling
        dead = (counts < reseed_ratio * jnp.max(counts)) & (step % reseed_every == 0)
        rank = jnp.cumsum(dead) - 1
        dead = dead & (rank < slots)
        seeds = x[far[jnp.clip(rank, 0, slots - 1)]]
        centroids = jnp.where(dead[:, None], seeds, centroids)
        counts = jnp.where(dead, jnp.min(jnp.where(dead, jnp.inf, counts)), counts)

    metrics = {"inertia": jnp.mean(d2), "empty": jnp.sum(n_assigned == 0).astype(jnp.int32),
               "reseeded": jnp.sum(dead).astype(jnp.int32), "step": step}
    return KMeansState(centroids, counts, step, jnp.ones((), jnp.bool_)), metrics


class MiniBatchKMeans:
    """Mini-batch k-means on all devices of a partitioner's mesh.

    Args:
      k, dim: centres and their dimension.
      seed: the key of step s is fold_in(key(seed), s), so a restored run continues exactly.
      partitioner: defaults to one over all devices on the 'data' axis.
      reseed_every, reseed_ratio, n_local_trials: see `update`.
    """

    STATE_KEYS = ("centroids", "counts", "step", "initialized")

    def __init__(self, k: int, dim: int, seed: int = 0, partitioner: Optional[partitioning.Partitioner] = None,
                 *, reseed_every: int = 10, reseed_ratio: float = 0.01, n_local_trials: Optional[int] = None):
        self.k, self.dim, self.seed = k, dim, seed
        self.partitioner = partitioner or partitioning.Partitioner(partitioning.create_mesh())
        self._replicated = self.partitioner.replicated()
        self._points_sharding = self.partitioner.logical_to_sharding(
            PartitionSpec("activation_batch", "activation_embed"))
        options = dict(reseed_every=reseed_every, reseed_ratio=reseed_ratio, n_local_trials=n_local_trials)

        def step_fn(state, points, key):
            return update(state, points, jax.random.fold_in(key, state.step), **options)

        self._step = self.partitioner.jit(step_fn, in_shardings=(self._replicated, self._points_sharding,
                                                                 self._replicated),
                                          out_shardings=(self._replicated, self._replicated))
        rows_sharding = self.partitioner.logical_to_sharding(PartitionSpec("activation_batch"))
        self._assign = self.partitioner.jit(assign, in_shardings=(self._replicated, self._points_sharding),
                                            out_shardings=(rows_sharding, rows_sharding))
        empty = init_state(k, dim)
        self.load_state_dict({name: np.asarray(getattr(empty, name)) for name in self.STATE_KEYS} | {"seed": seed})

    # -- data ---------------------------------------------------------------------------------------------
    def _check(self, points: Any) -> None:
        shape = tuple(np.shape(points))
        if len(shape) != 2 or shape[1] != self.dim:
            raise ValueError(f"k-means points have shape {shape}; expected [batch, {self.dim}] (dim={self.dim})")

    def shard(self, points: Any) -> jax.Array:
        """This process's rows [n_local, dim] (host array) or a global jax.Array -> the global batch, sharded
        over the data axes. Raises MeshShapeError naming the batch size if it does not divide them."""
        self._check(points)
        global_rows = points.shape[0] if isinstance(points, jax.Array) else points.shape[0] * jax.process_count()
        self.partitioner.check_global_batch(global_rows, "k-means batch size (points.shape[0])")
        if isinstance(points, jax.Array):
            return jax.device_put(points, self._points_sharding)
        return jax.make_array_from_process_local_data(self._points_sharding, np.asarray(points, np.float32))

    # -- fitting ------------------------------------------------------------------------------------------
    def step(self, points: Any) -> dict[str, jax.Array]:
        """One update on a batch [n, dim] (see `shard`); returns the metrics of `update` (device scalars)."""
        sharded = self.shard(points)
        if not self._initialized and sharded.shape[0] < self.k:
            raise ValueError(f"the first k-means batch seeds the centres: it needs >= k={self.k} points, "
                             f"got batch size {sharded.shape[0]}")
        # At most one step in flight, and no eager op between steps (the key is made once): on XLA:CPU with
        # several devices (jax 0.10.2), queued multi-device steps interleaved with single-device launches were
        # seen to deadlock in the all-reduce. The batch is already on its way to the devices, so the wait costs
        # little elsewhere.
        jax.block_until_ready(self.state)
        with self.partitioner.activate():
            self.state, metrics = self._step(self.state, sharded, self._key)
        self._initialized = True
        return metrics

    def fit(self, batches: Iterable[Any], num_steps: Optional[int] = None) -> list[dict[str, float]]:
        """Steps over `batches` ([n, dim] each) until num_steps steps (default: all) -> per-step metrics."""
        history = [self.step(points) for points in itertools.islice(batches, num_steps)]
        return [{name: value.item() for name, value in m.items()} for m in jax.device_get(history)]

    def predict(self, points: Any) -> np.ndarray:
        """Nearest centre of each row of points [n, dim] (any n; one process) -> ids [n] int32."""
        self._check(points)
        points = np.asarray(points, np.float32)
        pad = -points.shape[0] % self.partitioner.data_parallel_size
        padded = np.concatenate([points, np.zeros((pad, self.dim), np.float32)])
        with self.partitioner.activate():
            ids, _ = self._assign(self.state.centroids, self.shard(padded))
        return np.asarray(ids)[:points.shape[0]]

    @property
    def centroids(self) -> np.ndarray:
        """[k, dim] f32."""
        return self.state_dict()["centroids"]

    # -- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """{'centroids' [k, dim], 'counts' [k], 'step' [], 'initialized' [], 'seed' []} as host arrays (from
        this process's replica; valid on every host)."""
        state = {name: np.asarray(getattr(self.state, name).addressable_data(0)) for name in self.STATE_KEYS}
        return state | {"seed": np.asarray(self.seed, np.int64)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of `state_dict` (the state is placed replicated on this object's mesh; 'seed' optional)."""
        centroids = np.asarray(state["centroids"], np.float32)
        if centroids.shape != (self.k, self.dim):
            raise ValueError(f"k-means state has centroids {centroids.shape}; this object has k={self.k}, "
                             f"dim={self.dim}")
        self.seed = int(state.get("seed", self.seed))
        host = KMeansState(centroids, np.asarray(state["counts"], np.float32), np.asarray(state["step"], np.int32),
                           np.asarray(state["initialized"], np.bool_))
        # Global arrays built from each process's identical host copy (device_put cannot place a sharding that
        # spans other processes' devices).
        self.state = jax.tree.map(
            lambda x: jax.make_array_from_callback(x.shape, self._replicated, lambda index: x[index]), host)
        seed = self.seed
        self._key = jax.jit(lambda: jax.random.key(seed), out_shardings=self._replicated)()
        self._initialized = bool(host.initialized)

    def save(self, path: str) -> None:
        """Writes `state_dict()` as one .npz file (local or cloud path; process 0 writes). The file is written
        beside `path` and renamed onto it, so a reader (or a kill) never sees half a file."""
        if jax.process_index() != 0:
            return
        buffer = io.BytesIO()
        np.savez(buffer, **self.state_dict())
        target = epath.Path(path)
        partial_file = target.parent / (target.name + ".partial")
        partial_file.write_bytes(buffer.getvalue())
        partial_file.replace(target)

    def restore(self, path: str) -> None:
        """Loads a file written by `save`; continuing gives the same result as a run never interrupted."""
        with np.load(io.BytesIO(epath.Path(path).read_bytes())) as data:
            self.load_state_dict({name: data[name] for name in data.files})
