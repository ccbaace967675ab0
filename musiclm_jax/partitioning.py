"""Meshes, logical-axis rules and the Partitioner: how every array of the project is laid out on devices.

Everything about sharding lives in this file:

* `MESH_AXES`: the mesh axes, `data` (pure data parallelism), `fsdp` (data parallelism whose parameters and
  optimizer state are sharded too) and `model` (tensor parallelism). A multi-slice (DCN) dimension multiplies
  into the same axes, as in MaxText: `dcn_parallelism={'data': 2}` puts two slices side by side on `data`.
* `standard_logical_axis_rules()`: the one table mapping every logical axis name the project uses onto mesh
  axes. Weight names (`embed`, `mlp`, ...) are kept apart from activation names (`activation_batch`, ...).
  A name the table does not know is an error, never silent replication.
* `Partitioner`: builds train states already sharded (`jax.jit(init, out_shardings=...)`), shards host batches
  into global arrays and compiles steps with in/out shardings and donation.

Use `with partitioner.activate():` (it enters `jax.set_mesh`, not the deprecated `with mesh:` under which
`nn.with_logical_constraint` is a silent no-op).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")
# Mesh axes over which the global batch is split.
BATCH_MESH_AXES = ("data", "fsdp")

LogicalRules = Sequence[tuple[str, Any]]


def standard_logical_axis_rules() -> tuple[tuple[str, Any], ...]:
    """The project's logical-axis rules: (logical name, mesh axis | tuple of mesh axes | None).

    `None` means "replicated on purpose". Every logical name used by a parameter, a cache or a constrained
    activation must appear here; `check_logical_names` enforces it.

    Weights (sharded by `fsdp` on their model dimension and by `model` on heads / mlp / vocab):
      vocab, embed, mlp, heads, kv, kv_heads (grouped-query K/V: replicated), layers (scan axis),
      relpos_buckets, table_rows (lookup tables of any row count: replicated rows), norm.
    Activations (batch split over data+fsdp, heads/mlp/vocab over model):
      activation_batch, activation_length, activation_embed, activation_heads, activation_kv,
      activation_kv_heads, activation_mlp, activation_vocab; audio: activation_time, activation_freq,
      activation_channels.
    Convolutions and codebooks (replicated): conv_width, conv_height, conv_in, conv_out, codebook_levels,
      codebook_codes, codebook_dim, lstm_gates, lstm_in.
    Decoding caches: cache_batch_heads (or cache_batch_kv_heads), cache_length, cache_kv.
    """
    return (
        # Activations.
        ("activation_batch", BATCH_MESH_AXES),
        ("activation_length", None),
        ("activation_embed", None),
        ("activation_heads", "model"),
        ("activation_kv", None),
        ("activation_kv_heads", None),
        ("activation_mlp", "model"),
        ("activation_vocab", "model"),
        # Audio activations [batch, time, channels] (and [batch, time, freq, channels] for spectrograms).
        ("activation_time", None),
        ("activation_freq", None),
        ("activation_channels", None),
        # Decoding caches.
        # [batch * heads, length, head_dim]: batch (major) over data+fsdp, heads over model.
        ("cache_batch_heads", BATCH_MESH_AXES + ("model",)),
        ("cache_batch_kv_heads", BATCH_MESH_AXES),
        ("cache_length", None),
        ("cache_kv", None),
        # Weights.
        ("vocab", "model"),
        ("embed", "fsdp"),
        ("mlp", "model"),
        ("heads", "model"),
        ("kv", None),
        ("kv_heads", None),
        ("layers", None),
        ("relpos_buckets", None),
        # Rows of lookup tables whose count need not divide the mesh (text towers' words, positions, types).
        ("table_rows", None),
        ("norm", None),
        # Convolutions (codec, discriminators, front ends): small, replicated; the batch carries the parallelism.
        ("conv_width", None),
        ("conv_height", None),
        ("conv_in", None),
        ("conv_out", None),
        # Codebooks [levels, codes, dim] (vector quantizers) and recurrent weights.
        ("codebook_levels", None),
        ("codebook_codes", None),
        ("codebook_dim", None),
        ("lstm_gates", None),
        ("lstm_in", None),
    )


class UnknownLogicalAxisError(ValueError):
    """A logical axis name that has no rule (it would otherwise be replicated silently)."""


class MeshShapeError(ValueError):
    """A mesh that does not match the devices, or a batch that does not divide the data axes."""


def _known_names(rules: LogicalRules) -> set[str]:
    return {name for name, _ in rules}


def active_rules() -> LogicalRules:
    """The rules set by `nn.logical_axis_rules(...)` (e.g. by `Partitioner.activate`), else the standard ones."""
    rules = nn.get_logical_axis_rules()
    return tuple(rules) if rules else standard_logical_axis_rules()


def check_logical_names(names: Sequence[Optional[str]], rules: LogicalRules, what: str) -> None:
    """Raises UnknownLogicalAxisError if any name in `names` has no rule; `what` names the array for the message."""
    known = _known_names(rules)
    unknown = [n for n in names if n is not None and n not in known]
    if unknown:
        raise UnknownLogicalAxisError(
            f"{what} uses logical axis name(s) {unknown} with no rule in the logical-axis rules; add them to "
            f"musiclm_jax.partitioning.standard_logical_axis_rules() (known names: {sorted(known)})"
        )


def constrain(x: jax.Array, logical_names: Sequence[Optional[str]]) -> jax.Array:
    """`nn.with_logical_constraint` that refuses logical names without a rule.

    Args:
      x: an activation, e.g. [batch, length, embed].
      logical_names: one logical name (or None) per dimension of x, e.g. ('activation_batch', ...).
    """
    if len(logical_names) != x.ndim:
        raise ValueError(f"constraint names {tuple(logical_names)} do not match an array of rank {x.ndim}")
    rules = active_rules()
    check_logical_names(logical_names, rules, f"activation constraint {tuple(logical_names)}")
    return nn.with_logical_constraint(x, tuple(logical_names), rules=rules)


# ----------------------------------------------------------------------------------------------------- meshes


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape per axis. `ici_parallelism` is within a slice, `dcn_parallelism` across slices.

    One axis of `ici_parallelism` may be -1: it takes whatever devices are left. The product of the ICI sizes
    must equal the devices per slice and the product of the DCN sizes the number of slices.
    """

    ici_parallelism: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: {"data": -1, "fsdp": 1, "model": 1})
    dcn_parallelism: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: {"data": 1, "fsdp": 1, "model": 1})


def _axis_sizes(parallelism: Mapping[str, int], num_devices: int, setting: str) -> list[int]:
    unknown = set(parallelism) - set(MESH_AXES)
    if unknown:
        raise MeshShapeError(f"{setting} names unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
    sizes = [int(parallelism.get(axis, 1)) for axis in MESH_AXES]
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshShapeError(f"{setting}={dict(parallelism)}: sizes must be positive or -1")
    if sizes.count(-1) > 1:
        raise MeshShapeError(f"{setting}={dict(parallelism)}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshShapeError(
                f"{setting}={dict(parallelism)}: {num_devices} devices are not divisible by the fixed axes "
                f"(product {known}), so the -1 axis cannot be filled")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshShapeError(
            f"{setting}={dict(parallelism)} describes {math.prod(sizes)} devices but there are {num_devices}; "
            f"set the sizes so that their product is {num_devices}, or make one of them -1")
    return sizes


def _num_slices(devices: Sequence[Any]) -> int:
    return len({getattr(d, "slice_index", 0) for d in devices})


def create_mesh(config: MeshConfig = MeshConfig(), devices: Optional[Sequence[Any]] = None) -> Mesh:
    """Builds a Mesh with axes ('data', 'fsdp', 'model') from a MeshConfig.

    Args:
      config: the per-axis sizes (see MeshConfig).
      devices: defaults to jax.devices(); abstract TPU devices from a topology work too (AOT compile).
    Raises:
      MeshShapeError if the sizes do not match the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    num_slices = _num_slices(devices)
    dcn = _axis_sizes(config.dcn_parallelism, num_slices, "dcn_parallelism")
    if len(devices) % num_slices:
        raise MeshShapeError(f"{len(devices)} devices do not split evenly into {num_slices} slices")
    ici = _axis_sizes(config.ici_parallelism, len(devices) // num_slices, "ici_parallelism")
    if num_slices > 1:
        device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        try:
            device_array = mesh_utils.create_device_mesh(ici, devices)
        except (ValueError, NotImplementedError, AssertionError):
            # Device kinds without a known physical layout: a plain row-major arrangement.
            device_array = np.asarray(devices).reshape(ici)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_shape(shape: Mapping[str, int], devices: Optional[Sequence[Any]] = None) -> Mesh:
    """Shorthand for tests and tools: create_mesh(MeshConfig(ici_parallelism=shape))."""
    return create_mesh(MeshConfig(ici_parallelism=dict(shape)), devices)


# ------------------------------------------------------------------------------------------------ partitioner


def unbox(tree: Any) -> Any:
    """Strips nn.LogicallyPartitioned boxes (without adding sharding constraints)."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
                        tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _path_to_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _dict_keys(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


class Partitioner:
    """Maps logical axis names onto a mesh, creates sharded state and compiles sharded steps.

    Args:
      mesh: from `create_mesh`.
      logical_axis_rules: defaults to `standard_logical_axis_rules()`. Rules earlier in the list win.
    """

    def __init__(self, mesh: Mesh, logical_axis_rules: Optional[LogicalRules] = None):
        self.mesh = mesh
        self.rules = tuple(logical_axis_rules) if logical_axis_rules is not None else standard_logical_axis_rules()
        for name, axes in self.rules:
            for axis in (axes if isinstance(axes, (tuple, list)) else (axes,)):
                if axis is not None and axis not in mesh.axis_names:
                    raise MeshShapeError(f"logical-axis rule ({name!r}, {axes!r}) names mesh axis {axis!r}, "
                                         f"which is not in the mesh axes {mesh.axis_names}")

    # -- context ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def activate(self):
        """Enters the mesh (jax.set_mesh) and the logical-axis rules, for tracing and running steps."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    # -- batch --------------------------------------------------------------------------------------------
    @property
    def data_parallel_size(self) -> int:
        return math.prod(self.mesh.shape[a] for a in BATCH_MESH_AXES)

    def check_global_batch(self, global_batch_size: int, setting: str = "batch_size") -> None:
        """Raises MeshShapeError unless the global batch divides the data axes and the processes."""
        if global_batch_size % self.data_parallel_size:
            raise MeshShapeError(
                f"{setting}={global_batch_size} is not divisible by the data-parallel mesh axes "
                f"{BATCH_MESH_AXES} of size {self.data_parallel_size} (mesh {dict(self.mesh.shape)})")
        if global_batch_size % jax.process_count():
            raise MeshShapeError(f"{setting}={global_batch_size} is not divisible by the "
                                 f"{jax.process_count()} processes")

    def batch_sharding(self, ndim: int) -> NamedSharding:
        """Sharding of a batch array [batch, ...]: batch over ('data', 'fsdp'), the rest replicated."""
        return NamedSharding(self.mesh, PartitionSpec(BATCH_MESH_AXES, *([None] * (ndim - 1))))

    def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Turns this process's slice of a batch ({name: [local_batch, ...]}) into global sharded arrays."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding(np.ndim(v)), np.asarray(v))
                for k, v in local_batch.items()}

    def pad_and_shard(self, rows: np.ndarray) -> tuple[jax.Array, int]:
        """Inference batches of any size (one process): rows [n, ...] -> (a global array [n', ...] laid over the
        data axes, n), with zero rows appended up to n', the next multiple of data_parallel_size. The caller
        drops the outputs of rows n and after."""
        if jax.process_count() > 1:
            raise NotImplementedError("pad_and_shard lays one process's rows out; with several processes use "
                                      "shard_batch with a batch each process holds a slice of")
        rows = np.asarray(rows)
        n = rows.shape[0]
        pad = -n % self.data_parallel_size
        if pad:
            rows = np.concatenate([rows, np.zeros((pad,) + rows.shape[1:], rows.dtype)])
        return jax.device_put(rows, self.batch_sharding(rows.ndim)), n

    # -- logical -> mesh ---------------------------------------------------------------------------------
    def logical_specs(self, boxed_tree: Any, what: str = "parameter") -> Any:
        """PartitionSpecs of logical names for a tree holding nn.LogicallyPartitioned boxes.

        Raises UnknownLogicalAxisError naming the array if a name has no rule.
        """
        specs = nn.get_partition_spec(boxed_tree)
        leaves = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
        for path, spec in leaves:
            if isinstance(spec, PartitionSpec):
                check_logical_names(tuple(spec), self.rules, f"{what} {_path_to_str(path)!r}")
        return specs

    def logical_to_sharding(self, logical_specs: Any) -> Any:
        """NamedShardings for a tree of logical PartitionSpecs (leaves that are not specs: replicated)."""
        def one(spec):
            if not isinstance(spec, PartitionSpec):
                return NamedSharding(self.mesh, PartitionSpec())
            return NamedSharding(self.mesh, nn.logical_to_mesh_axes(tuple(spec), self.rules))
        return jax.tree.map(one, logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def state_shardings(self, abstract_state: Any, variables_shardings: Any, abstract_variables: Any) -> Any:
        """Shardings for every leaf of a train state built from variables sharded as `variables_shardings`.

        A state leaf that sits under the same dictionary path as a variable (below its collection name, e.g.
        an Adam moment of a parameter) and has the same shape takes that variable's sharding; every other leaf
        (step counters, Adafactor's factored second moments) is small and replicated.
        """
        by_path = {}
        for path, sharding in jax.tree_util.tree_leaves_with_path(variables_shardings):
            by_path[_dict_keys(path)[1:]] = sharding
        shapes = {_dict_keys(path)[1:]: tuple(leaf.shape)
                  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_variables)}

        def one(path, leaf):
            keys = _dict_keys(path)
            for start in range(len(keys)):
                suffix = keys[start:]
                if suffix in by_path and shapes[suffix] == tuple(np.shape(leaf)):
                    return by_path[suffix]
            return self.replicated()
        return jax.tree_util.tree_map_with_path(one, abstract_state)

    def create_train_state(self, init_variables: Callable[[jax.Array], Any],
                           make_state: Callable[[Any], Any], rng: jax.Array) -> tuple[Any, Any]:
        """Creates a train state directly in its sharded layout.

        Args:
          init_variables: rng -> Flax variables holding nn.LogicallyPartitioned boxes (model.get_initial_variables).
          make_state: unboxed variables -> train state (e.g. TrainState.create).
          rng: the init key.
        Returns:
          (state, state_shardings); the state is created by `jax.jit(init, out_shardings=state_shardings)`, so no
          device ever holds an unsharded copy.
        Raises:
          UnknownLogicalAxisError if a variable uses a logical axis name with no rule.
        """
        _, shardings = self.abstract_train_state(init_variables, make_state, rng)
        with self.activate():
            state = jax.jit(lambda key: make_state(unbox(init_variables(key))), out_shardings=shardings)(rng)
        return state, shardings

    def abstract_train_state(self, init_variables: Callable[[jax.Array], Any], make_state: Callable[[Any], Any],
                             rng: jax.Array) -> tuple[Any, Any]:
        """(ShapeDtypeStructs of the train state carrying their shardings, shardings) without allocating it."""
        with self.activate():
            abstract_boxed = jax.eval_shape(init_variables, rng)
            variables_shardings = self.logical_to_sharding(self.logical_specs(abstract_boxed, "parameter"))
            abstract_state = jax.eval_shape(lambda key: make_state(unbox(init_variables(key))), rng)
            shardings = self.state_shardings(abstract_state, variables_shardings, unbox(abstract_boxed))
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, shardings)
        return abstract, shardings

    # -- compile ------------------------------------------------------------------------------------------
    def jit(self, fn: Callable, in_shardings: Any, out_shardings: Any, donate_argnums: Sequence[int] = (),
            static_argnums: Sequence[int] = ()) -> Callable:
        """jax.jit with explicit shardings; call the result inside `activate()`."""
        return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                       donate_argnums=tuple(donate_argnums), static_argnums=tuple(static_argnums))

    def largest_replicated_param_bytes(self, abstract_params: Any, params_shardings: Any) -> tuple[int, str]:
        """(bytes, path) of the largest parameter that is fully replicated (MaxText's sharding check)."""
        best = (0, "")
        flat_shardings = dict((_path_to_str(p), s) for p, s in jax.tree_util.tree_leaves_with_path(params_shardings))
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
            name = _path_to_str(path)
            sharding = flat_shardings[name]
            if sharding.is_fully_replicated:
                size = int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
                best = max(best, (size, name))
        return best
