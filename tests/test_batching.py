"""``jax.vmap`` of the ops is one call, hence one kernel launch: the batch folds into the ops'
rows, nodes, edges or species, with offset indices (``dispatch._batch``).

For each op, on the reference and on the Pallas kernels in interpret mode (both styles: the
Triton kernels, which backend ``"pallas"`` runs on CPU, and the Mosaic ones), a batch of 3
padded graphs or row sets, padded differently (out-of-range indices, which drop an edge or
give a row of NaN), equals the per-element results stacked: forward, per-element gradients
(``vmap`` of ``grad``) and the gradient of a loss summed over the batch (training), for the
in_axes of batched graphs, shared weights, ensembles of weights and shared node features.
The program of ``jax.vmap(op)`` binds one ``e3kernels_call`` of an unbatched target, and the
TPU lowering has as many Mosaic calls as one element's, outside any loop.

Shapes are tiny: the kernels run in interpret mode.
"""

from __future__ import annotations

import functools
from importlib import import_module

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close
from jax._src import core as jax_core

from e3kernels import dispatch, ops

B = 3  # batch elements
S = 3  # weight sets (species)
LINEAR_PLAN = ops.linear_plan("2x0e + 1o", "1x0e + 2x1o", biases=True)
SYMMETRIC_PLAN = ops.symmetric_contraction_plan("0e + 1o", (1, 2), keep_irrep_out="0e + 1o")
CONV_PLAN = ops.convolution_plan("0e + 1o", "0e + 1o", "0e + 1o")


def _normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _padded_indices(rng, shape, size):
    """``(B, n)`` indices in ``[0, size)``, padded differently per element: element 0 with
    ``size`` (just past the end: the next element's first index, were it offset naively),
    element 1 with ``-1`` and ``2 * size``, element 2 not at all."""
    indices = np.asarray(rng.integers(0, size, shape), np.int32)
    indices[0, -2:] = size
    indices[1, 0], indices[1, -1] = -1, 2 * size
    return jnp.asarray(indices)


class IndexedLinear:
    name = "indexed_linear"
    #: in_axes of (x, params, indices): rows batched with shared weights, everything batched,
    #: an ensemble of weights on shared rows
    IN_AXES = {"shared_weights": (0, None, 0), "all": (0, 0, 0), "ensemble": (None, 0, None)}

    def __init__(self):
        rng, plan = np.random.default_rng(0), LINEAR_PLAN
        self.x = _normal(rng, (B, 6, plan.dim_in))
        self.params = (
            tuple(_normal(rng, (B,) + s) for s in plan.weight_shapes(S)),
            tuple(_normal(rng, (B,) + s) for s in plan.bias_shapes(S)),
        )
        self.indices = _padded_indices(rng, (B, 6), S)

    @staticmethod
    def op(backend):
        def f(x, params, indices):
            weights, biases = params
            return ops.indexed_linear(x, weights, indices, LINEAR_PLAN, biases=biases, backend=backend)

        return f


class SymmetricContraction:
    name = "symmetric_contraction"
    IN_AXES = IndexedLinear.IN_AXES

    def __init__(self):
        rng, plan = np.random.default_rng(1), SYMMETRIC_PLAN
        self.x = _normal(rng, (B, 6, 2, plan.dim_in))
        self.params = tuple(_normal(rng, (B, S, p.mul, 2)) for p in plan.paths)
        self.indices = _padded_indices(rng, (B, 6), S)

    @staticmethod
    def op(backend):
        def f(x, params, indices):
            return ops.symmetric_contraction(x, params, SYMMETRIC_PLAN, indices=indices, backend=backend)

        return f


class Convolution:
    name = "equivariant_convolution"
    #: in_axes of (x, (sh, weights), (senders, receivers)): batched graphs, shared node
    #: features with batched edges, shared edge features on batched graphs
    IN_AXES = {"all": (0, 0, 0), "shared_nodes": (None, 0, 0), "shared_edge_params": (0, None, 0)}

    def __init__(self):
        rng, plan = np.random.default_rng(2), CONV_PLAN
        nodes, edges = 5, 8
        self.x = _normal(rng, (B, nodes, 2, plan.dim_in))
        self.params = (_normal(rng, (B, edges, plan.dim_sh)), _normal(rng, (B, edges, plan.num_paths, 2)))
        senders = _padded_indices(rng, (B, edges), nodes)
        receivers = jnp.asarray(rng.integers(0, nodes, (B, edges)), jnp.int32)
        receivers = receivers.at[2, 3].set(nodes)  # element 2 drops an edge by its receiver
        self.indices = (senders, receivers)

    @staticmethod
    def op(backend):
        def f(x, params, edges):
            sh, weights = params
            return ops.equivariant_convolution(x, sh, weights, *edges, CONV_PLAN, avg_num_neighbors=2.0,
                                               backend=backend)

        return f


OPS = [IndexedLinear, SymmetricContraction, Convolution]


#: the ops whose Mosaic kernels (in interpret mode) were traced
MOSAIC_TRACED: list[str] = []


def _mosaic_interpret(op_name, implementations):
    """``implementations`` of a kernel module with the TPU (Mosaic) kernels in interpret mode
    as the CPU kernels, in place of the Triton ones; records that they were traced."""

    @functools.wraps(implementations)
    def patched(*args, **kwargs):
        kernels = implementations(*args, **kwargs)
        if isinstance(kernels, str):
            return kernels
        if op_name == "indexed_linear":
            mosaic = functools.partial(kernels["tpu"], interpret=True)
        else:
            config = import_module(f"e3kernels.kernels.{op_name}").MOSAIC_INTERPRET
            mosaic = functools.partial(kernels["tpu"], config=config)

        def traced(*a):
            MOSAIC_TRACED.append(op_name)
            return mosaic(*a)

        return dict(kernels, interpret=traced)

    return patched


class Kernels:
    """The ``backend`` argument of the ops, and how to run a function of them."""

    def __init__(self, backend: str, inline: bool = False):
        self.backend, self.inline = backend, inline

    def run(self, fn):
        """``fn`` jitted. With ``inline``, the ``e3kernels_call`` equations of ``fn``'s
        program (batched: the folded calls) run their CPU implementation inline: Pallas'
        TPU interpreter talks to the host through ordered callbacks, which the primitive's
        lowering cannot carry (the Mosaic kernels reach CPU tests only inlined)."""
        return jax.jit(_inlined(fn) if self.inline else fn)


def _inlined(fn):
    def run(*args):
        closed = jax.make_jaxpr(fn)(*args)
        out = _eval_inlined(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(jax.eval_shape(fn, *args)), out)

    return run


def _eval_inlined(jaxpr, consts, args):
    env = {}
    read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]
    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if eqn.primitive is dispatch.call_p:
            outs = eqn.params["target"].implementation("cpu")(*invals)
        else:
            params = eqn.primitive.get_bind_params(eqn.params)
            # older JAX returns (subfuns, params)
            subfuns, params = params if isinstance(params, tuple) else ((), params)
            outs = eqn.primitive.bind(*subfuns, *invals, **params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        for var, value in zip(eqn.outvars, outs):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


@pytest.fixture(params=["reference", "triton", "mosaic"])
def kernels(request, monkeypatch):
    """The reference, or backend "pallas" on CPU with the Triton (its default) or the
    Mosaic kernels in interpret mode."""
    if request.param == "mosaic":
        for case in OPS:
            module = import_module(f"e3kernels.kernels.{case.name}")
            patched = _mosaic_interpret(case.name, module.implementations)
            monkeypatch.setattr(module, "implementations", patched)
        MOSAIC_TRACED.clear()
        yield Kernels("pallas", inline=True)
        assert MOSAIC_TRACED, "the Mosaic kernels were not traced"
        return
    yield Kernels("reference" if request.param == "reference" else "pallas")


def _args(case, in_axes):
    """The case's batch, with element 0 in place of the unmapped arguments."""
    batch = (case.x, case.params, case.indices)
    return tuple(a if axis == 0 else jax.tree.map(lambda t: t[0], a) for a, axis in zip(batch, in_axes))


def _element(args, in_axes, b):
    return tuple(jax.tree.map(lambda t: t[b], a) if axis == 0 else a for a, axis in zip(args, in_axes))


def _stacked(fn, args, in_axes, run=jax.jit):
    """``fn`` per batch element (one unbatched call each), stacked."""
    fn = run(fn)
    results = [fn(*_element(args, in_axes, b)) for b in range(B)]
    return jax.tree.map(lambda *r: jnp.stack(r), *results)


def _calls(fn, *args):
    """The targets of the ``e3kernels_call`` equations of ``fn``'s program (nested ones too)."""
    targets = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive is dispatch.call_p:
                targets.append(eqn.params["target"])
            for sub in jax_core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return targets


def _batched_calls(targets):
    """How many targets map their implementations with ``jax.vmap`` (any level)."""

    def batched(target):
        if isinstance(target, dispatch.Batched):
            return True
        inner = getattr(target, "inner", None)
        return inner is not None and batched(inner)

    return sum(batched(t) for t in targets)


def _loss(f, projection):
    """A scalar loss on ``f``'s output; rows of NaN (out-of-range indices) count zero."""

    def loss(x, params, indices):
        out = f(x, params, indices)
        return jnp.sum(projection * jnp.where(jnp.isnan(out), 0.0, out))

    return loss


def _projection(case, f):
    out = jax.eval_shape(f, *_element((case.x, case.params, case.indices), (0, 0, 0), 0))
    return jnp.asarray(np.random.default_rng(5).standard_normal(out.shape), jnp.float32)


@pytest.mark.parametrize("case_type", OPS, ids=lambda c: c.name)
def test_vmap_is_one_call_equal_to_the_elements(case_type, kernels):
    case = case_type()
    f = case.op(kernels.backend)
    for name, in_axes in case.IN_AXES.items():
        args = _args(case, in_axes)
        batched = jax.vmap(f, in_axes=in_axes)
        targets = _calls(batched, *args)
        assert len(targets) == 1 and not _batched_calls(targets), (name, targets)
        assert_trees_close(kernels.run(batched)(*args), _stacked(f, args, in_axes, kernels.run))


# The Mosaic kernels at folded sizes run in the forward test; their derivatives are the
# same kernels (the fold is the dispatch's, backend-independent), and interpret mode is slow.
@pytest.mark.parametrize("kernels", ["reference", "triton"], indirect=True)
@pytest.mark.parametrize("case_type", OPS, ids=lambda c: c.name)
def test_gradients_of_a_batch_are_one_call_each(case_type, kernels):
    """Per-element gradients (``vmap`` of ``grad``) and training (``grad`` of a loss summed
    over a ``vmap``), with respect to the inputs and the weights."""
    case = case_type()
    f = case.op(kernels.backend)
    loss = _loss(f, _projection(case, f))
    grad = jax.grad(loss, argnums=(0, 1))
    for name, in_axes in case.IN_AXES.items():
        if kernels.backend != "reference" and name != "all":
            continue  # interpret mode is slow: one in_axes combination for the kernels
        args = _args(case, in_axes)
        expected = _stacked(grad, args, in_axes, kernels.run)
        per_element = jax.vmap(grad, in_axes=in_axes)
        assert not _batched_calls(_calls(per_element, *args)), name
        assert_trees_close(kernels.run(per_element)(*args), expected, rtol=1e-4, atol=1e-4)

        batch_loss = jax.vmap(loss, in_axes=in_axes)
        summed = jax.grad(lambda *a, batch_loss=batch_loss: jnp.sum(batch_loss(*a)), argnums=(0, 1))
        assert not _batched_calls(_calls(summed, *args)), name
        # an unmapped input's gradient sums its elements' gradients
        expected = tuple(e if axis == 0 else jax.tree.map(lambda t: t.sum(0), e)
                         for e, axis in zip(expected, in_axes))
        assert_trees_close(kernels.run(summed)(*args), expected, rtol=1e-4, atol=1e-4)


def test_nested_vmap_of_graphs_is_one_call():
    """A batch of batches of graphs folds twice, into one graph."""
    case = Convolution()
    f = case.op("reference")
    batched = jax.vmap(jax.vmap(f, in_axes=(None, 0, 0)), in_axes=(0, None, None))
    args = (case.x, case.params, case.indices)
    targets = _calls(batched, *args)
    assert len(targets) == 1 and not _batched_calls(targets)
    expected = jnp.stack([_stacked(f, (x, case.params, case.indices), (None, 0, 0)) for x in case.x])
    assert_trees_close(jax.jit(batched)(*args), expected)


def test_shared_weights_without_a_space_fall_back_to_vmap():
    """Symmetric contraction's shared weights ``(mul, C)`` have no axis to fold a batch of
    them into: an ensemble of them, or per-element gradients of them, is ``jax.vmap`` of the
    implementation (correct, one launch per element). A batch of rows still folds."""
    rng = np.random.default_rng(3)
    x = _normal(rng, (B, 6, 2, SYMMETRIC_PLAN.dim_in))
    weights = tuple(_normal(rng, (B, p.mul, 2)) for p in SYMMETRIC_PLAN.paths)
    f = lambda x, w: ops.symmetric_contraction(x, w, SYMMETRIC_PLAN, backend="reference")
    ensemble = jax.vmap(f, in_axes=(None, 0))
    assert _batched_calls(_calls(ensemble, x[0], weights)) == 1
    assert_trees_close(jax.jit(ensemble)(x[0], weights), _stacked(f, (x[0], weights), (None, 0)))

    rows = jax.vmap(f, in_axes=(0, None))
    weights0 = jax.tree.map(lambda t: t[0], weights)
    targets = _calls(rows, x, weights0)
    assert len(targets) == 1 and not _batched_calls(targets)
    assert_trees_close(jax.jit(rows)(x, weights0), _stacked(f, (x, weights0), (0, None)))

    grad = jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=1)
    per_element = jax.vmap(grad, in_axes=(0, None))
    assert _batched_calls(_calls(per_element, x, weights0)) >= 1  # the weights' Vjp
    assert_trees_close(jax.jit(per_element)(x, weights0), _stacked(grad, (x, weights0), (0, None)),
                       rtol=1e-4, atol=1e-4)


def _count(text, what):
    return text.count(what)


@pytest.mark.parametrize("case_type", OPS, ids=lambda c: c.name)
def test_tpu_lowering_of_a_batch_launches_each_kernel_once(case_type):
    """Lowered for TPU, the batch's program has the Mosaic calls of one element's program,
    none inside a loop (Pallas would batch a kernel's scalar prefetch with a while loop)."""
    case = case_type()
    f = case.op("pallas")
    in_axes = (0, 0, 0)
    args = _args(case, in_axes)
    lower = lambda fn, *a: jax.jit(fn).trace(*a).lower(lowering_platforms=("tpu",)).as_text()
    single = lower(f, *_element(args, in_axes, 0))
    batched = lower(jax.vmap(f, in_axes=in_axes), *args)
    assert _count(single, "tpu_custom_call") >= 1
    assert _count(batched, "tpu_custom_call") == _count(single, "tpu_custom_call")
    # no loop added around them (the element's own program may have loops of its own)
    assert _count(batched, "stablehlo.while") == _count(single, "stablehlo.while")
