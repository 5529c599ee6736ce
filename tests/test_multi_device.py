"""Data-parallel use on 4 virtual CPU devices (see conftest.py): rows sharded over a mesh
in a plain ``jax.jit`` and in ``jax.shard_map``, against one device and the spec, with the
compiled programs checked for what crosses devices.

The op cases, the force-training loss and the projection are those of
``test_transformations.py``.
"""

from __future__ import annotations

import re

import jax
import pytest
from conftest import assert_trees_close
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_transformations import CPU_PROGRAMS, OPS, _projection, force_training_loss, ids

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def _row_mesh(axis_type=jax.sharding.AxisType.Auto):
    # tests/conftest.py asks XLA for 4 virtual CPU devices before JAX starts: fewer means
    # something reset XLA_FLAGS first, which must not pass silently
    assert len(jax.devices()) >= 4, f"4 devices expected, got {jax.devices()}"
    return jax.make_mesh((4,), ("rows",), axis_types=(axis_type,))


def collectives(compiled) -> dict[str, int]:
    """How many of each cross-device operation a compiled program runs."""
    text = compiled.as_text()
    return {name: len(re.findall(rf"\b{name}(?:-start)?\(", text)) for name in COLLECTIVES}


def _sharded(case, mesh):
    rows, replicated = NamedSharding(mesh, P("rows")), NamedSharding(mesh, P())
    return (jax.device_put(case.x, rows), jax.device_put(case.params, replicated),
            jax.device_put(case.indices, rows))


@pytest.mark.parametrize("backend", CPU_PROGRAMS)
@pytest.mark.parametrize("case_type", OPS, ids=ids)
def test_sharded_jit_keeps_rows_on_their_devices(case_type, backend):
    """Rows sharded over 4 devices in a plain ``jax.jit``: the forward pass computes each
    device's rows where they are (no collective at all, output sharded like the input);
    the force-training gradient (second order) gathers no rows and all-reduces only the
    parameters' gradient. Numbers as on one device."""
    case = case_type(rows=16)
    mesh = _row_mesh()
    x, params, indices = _sharded(case, mesh)

    forward = jax.jit(case.op(backend))
    out = forward(x, params, indices)
    assert_trees_close(out, case.spec(case.x, case.params, case.indices))
    assert out.sharding.spec[0] == "rows"
    assert collectives(forward.lower(x, params, indices).compile()) == dict.fromkeys(COLLECTIVES, 0)

    projection = jax.device_put(_projection(case), NamedSharding(mesh, P("rows")))
    step = jax.jit(jax.grad(force_training_loss(case.op(backend), indices, projection), argnums=(0, 1)))
    expected = jax.grad(force_training_loss(case.spec, case.indices, _projection(case)), argnums=(0, 1))(
        case.params, case.x)
    assert_trees_close(step(params, x), expected, rtol=2e-4, atol=2e-4)
    counts = collectives(step.lower(params, x).compile())
    assert counts["all-gather"] == counts["all-to-all"] == counts["collective-permute"] == 0, counts
    # the op's parameter gradient (one all-reduce per differentiation that reaches it) and
    # the loss's own sum; every row stays on its device
    assert 1 <= counts["all-reduce"] <= 3, counts


@pytest.mark.parametrize("case_type", OPS, ids=ids)
def test_rows_not_divisible_by_devices_give_the_one_device_numbers(case_type):
    """10 rows constrained to 4 devices cannot be split evenly (XLA would pad the last
    shard): the op then runs on every row, with the one-device numbers."""
    case = case_type(rows=10)
    mesh = _row_mesh()
    rows = NamedSharding(mesh, P("rows"))

    def f(x, params, indices):
        x = jax.lax.with_sharding_constraint(x, rows)
        indices = jax.lax.with_sharding_constraint(indices, rows)
        return case.op("reference")(x, params, indices)

    assert_trees_close(jax.jit(f)(case.x, case.params, case.indices),
                       case.spec(case.x, case.params, case.indices))


@pytest.mark.parametrize("case_type", OPS, ids=ids)
def test_shard_map_checks_varying_axes_to_second_order(case_type, backend="reference"):
    """Rows split over 4 devices in ``jax.shard_map`` with ``check_vma=True`` (the default):
    output, and gradients of the force-training loss (parameters replicated, so their
    gradient is summed over devices), as on one device. (One backend, for CI time: the
    varying-axes rules are the dispatch's, the same for every backend, and the kernels
    run per device in the sharded-jit test.)"""
    case = case_type(rows=8)
    mesh = _row_mesh()
    sharded = jax.shard_map(case.op(backend), mesh=mesh, in_specs=(P("rows"), P(), P("rows")),
                            out_specs=P("rows"))
    assert_trees_close(jax.jit(sharded)(case.x, case.params, case.indices),
                       case.spec(case.x, case.params, case.indices))
    projection = _projection(case)

    def grads(f):
        return jax.jit(jax.grad(force_training_loss(f, case.indices, projection), argnums=(0, 1)))(
            case.params, case.x)

    assert_trees_close(grads(sharded), grads(case.spec), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("case_type", OPS, ids=ids)
def test_explicit_mesh_axes_type_rows_as_sharded(case_type):
    """With ``Explicit`` mesh axes (shardings in types) the op's output type is sharded
    like its rows, and the force-training gradient has the one-device numbers."""
    case = case_type(rows=16)
    mesh = _row_mesh(jax.sharding.AxisType.Explicit)
    with jax.set_mesh(mesh):
        x, params, indices = _sharded(case, mesh)
        out_type = jax.eval_shape(case.op("reference"), x, params, indices)
        assert out_type.sharding.spec[0] == "rows"
        out = jax.jit(case.op("reference"))(x, params, indices)
        projection = jax.device_put(_projection(case), NamedSharding(mesh, P("rows")))
        grads = jax.jit(jax.grad(force_training_loss(case.op("reference"), indices, projection),
                                 argnums=(0, 1)))(params, x)
    assert_trees_close(out, case.spec(case.x, case.params, case.indices))
    expected = jax.grad(force_training_loss(case.spec, case.indices, _projection(case)), argnums=(0, 1))(
        case.params, case.x)
    assert_trees_close(grads, expected, rtol=2e-4, atol=2e-4)


def test_data_parallel_training_step_of_the_modules_keeps_rows_sharded():
    """A small MACE-style block of the Haiku modules (``data_parallel_model.py``), trained
    on energy and forces (second order), with atoms sharded over 4 devices: the one-device
    loss and gradients, and no atom is gathered across devices."""
    from data_parallel_model import inputs, step

    params, *per_atom = inputs()
    expected = step(params, *per_atom)
    mesh = _row_mesh()
    rows = NamedSharding(mesh, P("rows"))
    sharded = (jax.device_put(params, NamedSharding(mesh, P())), *(jax.device_put(a, rows) for a in per_atom))
    assert_trees_close(step(*sharded), expected, rtol=2e-4, atol=2e-4)
    counts = collectives(step.lower(*sharded).compile())
    assert counts["all-gather"] == counts["all-to-all"] == counts["collective-permute"] == 0, counts


def test_batch_norm_and_dropout_with_rows_sharded():
    """The two modules without an e3kernels op (e3nn-jax's, subclassed): with rows sharded
    over 4 devices, BatchNorm's batch statistics and Dropout's mask give the one-device
    numbers, and the output stays sharded."""
    import e3nn_jax as e3nn
    import haiku as hk

    import e3kernels

    def f(x, is_training):
        x = e3kernels.haiku.BatchNorm()(x, is_training=is_training)
        return e3kernels.haiku.Dropout(0.3)(hk.next_rng_key(), x, is_training=is_training).array

    model = hk.transform_with_state(f)
    x = e3nn.normal("2x0e + 1o", jax.random.PRNGKey(0), (16,))
    params, state = model.init(jax.random.PRNGKey(1), x, True)
    step = jax.jit(model.apply, static_argnums=4)
    expected = step(params, state, jax.random.PRNGKey(2), x, True)

    mesh = _row_mesh()
    xs = jax.device_put(x, NamedSharding(mesh, P("rows")))
    out, new_state = step(params, state, jax.random.PRNGKey(2), xs, True)
    assert_trees_close((out, new_state), expected)
    assert out.sharding.spec[0] == "rows"


def test_export_of_a_sharded_program():
    """``jax.export`` of a jit with rows sharded over 4 devices serializes (no
    partitioning callback in the module: there the op runs on all rows) and its call gives
    the spec's numbers."""
    from jax import export
    from test_transformations import IndexedLinear

    case = IndexedLinear(rows=16)
    mesh = _row_mesh()
    rows, replicated = NamedSharding(mesh, P("rows")), NamedSharding(mesh, P())
    f = jax.jit(case.op("reference"), in_shardings=(rows, replicated, rows), out_shardings=rows)
    exported = export.deserialize(export.export(f)(case.x, case.params, case.indices).serialize())
    with jax.set_mesh(mesh):
        out = exported.call(*_sharded(case, mesh))
    assert_trees_close(out, case.spec(case.x, case.params, case.indices))
