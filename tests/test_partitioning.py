"""Meshes, logical-axis rules and the Partitioner: golden shardings and clear errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import mesh, tiny_model
from musiclm_jax import optimizers, partitioning
from musiclm_jax.train_state import TrainState


def test_mesh_fills_minus_one_and_names_axes():
    m = partitioning.create_mesh(partitioning.MeshConfig(ici_parallelism={"data": -1, "model": 2}))
    assert dict(m.shape) == {"data": 4, "fsdp": 1, "model": 2}
    assert m.axis_names == partitioning.MESH_AXES
    m = partitioning.create_mesh(partitioning.MeshConfig(ici_parallelism={"data": 1, "fsdp": -1, "model": 1}))
    assert dict(m.shape) == {"data": 1, "fsdp": 8, "model": 1}


@pytest.mark.parametrize("ici, message", [
    ({"data": 2, "model": 2}, "describes 4 devices but there are 8"),
    ({"data": -1, "model": -1}, "at most one axis may be -1"),
    ({"data": -1, "model": 3}, "not divisible by the fixed axes"),
    ({"data": 8, "tensor": 1}, "unknown mesh axes"),
])
def test_mesh_that_does_not_fit_the_devices_is_an_error(ici, message):
    with pytest.raises(partitioning.MeshShapeError, match=message):
        partitioning.create_mesh(partitioning.MeshConfig(ici_parallelism=ici))


def test_dcn_axis_must_match_the_number_of_slices():
    # CPU devices form one slice; asking for two slices is an error naming the setting.
    with pytest.raises(partitioning.MeshShapeError, match="dcn_parallelism"):
        partitioning.create_mesh(partitioning.MeshConfig(ici_parallelism={"data": -1},
                                                         dcn_parallelism={"data": 2}))


def _make_state_fns(model, optimizer):
    shapes = model.input_shapes(2)
    return (lambda rng: model.get_initial_variables(rng, shapes)), (lambda v: TrainState.create(v, optimizer.tx))


def test_golden_shardings_of_the_tiny_model_on_data2_model4():
    model = tiny_model(num_heads=4)
    opt = optimizers.create_optimizer(name="adamw", learning_rate=1e-3)
    partitioner = partitioning.Partitioner(mesh(2, 4))
    state, shardings = partitioner.create_train_state(*_make_state_fns(model, opt), jax.random.key(0))
    specs = jax.tree.map(lambda x: x.sharding.spec, state.params)
    golden = {
        "token_embedder": {"embedding": P("model", "fsdp")},
        "relpos_bias": {"rel_embedding": P(None, "model")},
        "final_norm": {"scale": P(None)},
        "logits_dense": {"kernel": P("fsdp", "model")},
    }
    layer = {
        "pre_attention_norm": {"scale": P(None)},
        "pre_mlp_norm": {"scale": P(None)},
        "attention": {"query": {"kernel": P("fsdp", "model", None)}, "key": {"kernel": P("fsdp", "model", None)},
                      "value": {"kernel": P("fsdp", "model", None)}, "out": {"kernel": P("model", None, "fsdp")}},
        "mlp": {"wi_0": {"kernel": P("fsdp", "model")}, "wi_1": {"kernel": P("fsdp", "model")},
                "wo": {"kernel": P("model", "fsdp")}},
    }
    golden.update({"layers_0": layer, "layers_1": layer})
    assert specs == golden
    # Adam moments follow their parameters; counters are replicated.
    adam = state.opt_state[1][0]
    assert jax.tree.map(lambda x: x.sharding.spec, adam.mu) == golden
    assert jax.tree.map(lambda x: x.sharding.spec, adam.nu) == golden
    assert state.step.sharding.is_fully_replicated
    # The state really is distributed: the 4-way 'model' axis splits the MLP kernel's hidden dimension.
    wi = state.params["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert {s.data.shape for s in wi.addressable_shards} == {(32, 16)}


def test_fsdp_and_scanned_layers_shard_the_embed_dimension():
    model = tiny_model(num_heads=4, scan_layers=True)
    opt = optimizers.create_optimizer(name="adafactor", learning_rate=1e-3)
    partitioner = partitioning.Partitioner(mesh(data=2, fsdp=2, model=2))
    state, _ = partitioner.create_train_state(*_make_state_fns(model, opt), jax.random.key(0))
    query = state.params["layers"]["attention"]["query"]["kernel"]
    assert query.shape == (2, 32, 4, 8)
    assert query.sharding.spec == P(None, "fsdp", "model", None)
    size, name = partitioner.largest_replicated_param_bytes(state.params, jax.tree.map(lambda x: x.sharding,
                                                                                         state.params))
    assert name in ("layers/pre_attention_norm/scale", "layers/pre_mlp_norm/scale") and size == 2 * 32 * 4


class _BadModule(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "channels")), (4, 4))
        return x @ w


def test_parameter_with_an_unknown_logical_name_is_an_error():
    partitioner = partitioning.Partitioner(mesh(2, 4))
    init = lambda rng: _BadModule().init(rng, jnp.ones((2, 4)))  # noqa: E731
    with pytest.raises(partitioning.UnknownLogicalAxisError, match=r"parameter 'params/w'.*\['channels'\]"):
        partitioner.create_train_state(init, lambda v: v, jax.random.key(0))


def test_activation_constraint_with_an_unknown_name_is_an_error():
    partitioner = partitioning.Partitioner(mesh(2, 4))
    with partitioner.activate():
        with pytest.raises(partitioning.UnknownLogicalAxisError, match="activation_sequence"):
            jax.jit(lambda x: partitioning.constrain(x, ("activation_batch", "activation_sequence")))(jnp.ones((8, 4)))
    # Outside any rules context the standard rules are checked too.
    with pytest.raises(partitioning.UnknownLogicalAxisError):
        partitioning.constrain(jnp.ones((8, 4)), ("activation_batch", "activation_sequence"))


def test_constraints_really_apply_under_the_mesh():
    partitioner = partitioning.Partitioner(mesh(2, 4))
    f = jax.jit(lambda x: partitioning.constrain(x * 2, ("activation_batch", "activation_mlp")))
    with partitioner.activate():
        y = f(jnp.ones((8, 16)))
    m = partitioner.mesh
    assert y.sharding.is_equivalent_to(jax.sharding.NamedSharding(m, P(("data", "fsdp"), "model")), 2)
    assert y.sharding.shard_shape(y.shape) == (4, 4)


def test_batch_that_does_not_divide_the_data_axes_is_an_error():
    partitioner = partitioning.Partitioner(mesh(data=4, model=2))
    partitioner.check_global_batch(8)
    with pytest.raises(partitioning.MeshShapeError, match=r"batch_size=6 is not divisible .* size 4"):
        partitioner.check_global_batch(6)


def test_rule_naming_a_missing_mesh_axis_is_an_error():
    rules = partitioning.standard_logical_axis_rules() + (("experts", "expert"),)
    with pytest.raises(partitioning.MeshShapeError, match="mesh axis 'expert'"):
        partitioning.Partitioner(mesh(2, 4), rules)


def test_every_name_the_transformer_uses_has_a_rule():
    model = tiny_model(scan_layers=True)
    boxed = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), model.input_shapes(2)))
    names = set()
    for spec in jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, P)):
        names.update(n for n in spec if n is not None)
    known = {name for name, _ in partitioning.standard_logical_axis_rules()}
    assert names <= known
    assert {"embed", "vocab", "mlp", "heads", "kv", "layers", "norm", "relpos_buckets"} <= names
    np.testing.assert_equal(len(known), len(partitioning.standard_logical_axis_rules()))  # one rule per name
