"""Executable specifications: each op's plain definition, the one every implementation
(reference and kernels, every backend) is tested against.

They follow the math of the ops' docstrings literally (a per-row copy of the weights, the
dense symmetric basis), so they are slow and memory-hungry: for tests and small inputs.
Accumulation is in float32, or float64 for float64 inputs; the output has ``x``'s dtype.

>>> import jax.numpy as jnp, e3nn_jax as e3nn
>>> from e3kernels import ops, spec
>>> plan = ops.linear_plan("2x0e", "1x0e")
>>> w = jnp.array([[[1.0], [1.0]], [[2.0], [0.0]]])
>>> spec.indexed_linear(jnp.array([[1.0, 2.0], [1.0, 2.0]]), [w], [], jnp.array([0, 1]), plan)
Array([[2.1213202],
       [1.4142135]], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from e3kernels.grouping import edge_in_range, in_range
from e3kernels.irreps import ConvolutionPlan, LinearPlan, SymmetricPlan


def accumulation_dtype(*arrays) -> jnp.dtype:
    """float32 for 16- and 32-bit floats, float64 when any input is float64."""
    return jnp.promote_types(jnp.float32, jnp.result_type(*arrays))


def indexed_linear(x, weights: Sequence, biases: Sequence, indices, plan: LinearPlan) -> jax.Array:
    r"""``out[n, v, m] = sum_b alpha_b sum_u x[n, u, m] W_b[s_n, u, v] + alpha_k B_k[s_n, v]``
    on e3nn's flat layout, ``s_n = indices[n]``; rows with ``s_n`` outside ``[0, S)`` are NaN.
    """
    params = tuple(weights) + tuple(biases)
    acc = accumulation_dtype(x, *params)
    num_sets = params[0].shape[0] if params else 1
    valid = in_range(indices, num_sets)
    safe = jnp.clip(indices, 0, max(num_sets - 1, 0))
    n = x.shape[0]
    out = jnp.zeros((n, plan.dim_out), acc)
    for b, w in zip(plan.blocks, weights):
        width_in, width_out = b.mul_in * b.ir_dim, b.mul_out * b.ir_dim
        xb = x[:, b.in_start : b.in_start + width_in].reshape(n, b.mul_in, b.ir_dim).astype(acc)
        wb = w.astype(acc)[safe] if num_sets else jnp.zeros((n, b.mul_in, b.mul_out), acc)
        yb = b.path_weight * jnp.einsum("num,nuv->nvm", xb, wb, precision="highest")
        out = out.at[:, b.out_start : b.out_start + width_out].add(yb.reshape(n, width_out))
    for b, w in zip(plan.biases, biases):
        wb = w.astype(acc)[safe] if num_sets else jnp.zeros((n, b.mul), acc)
        out = out.at[:, b.out_start : b.out_start + b.mul].add(b.path_weight * wb)
    out = jnp.where(valid[:, None], out, jnp.nan) if params else out
    return out.astype(x.dtype)


def symmetric_contraction(x, weights: Sequence, plan: SymmetricPlan, indices=None) -> jax.Array:
    r"""``out[n, c, i] = sum_p sum_k W_p[s_n, k, c] sum_j U_p[j_1..j_nu, k, i] x[n, c, j_1]
    .. x[n, c, j_nu]`` with the dense basis ``U_p`` of each path; shared weights ``(mul, C)``
    when ``indices`` is ``None``; rows with an index outside ``[0, S)`` are NaN."""
    weights = tuple(weights)
    acc = accumulation_dtype(x, *weights)
    n, c = x.shape[:2]
    xa = x.astype(acc)
    out = jnp.zeros((n, c, plan.dim_out), acc)
    num_sets = weights[0].shape[0] if indices is not None and weights else 1
    safe = None if indices is None else jnp.clip(indices, 0, max(num_sets - 1, 0))
    for p, w in zip(plan.paths, weights):
        w = w.astype(acc)
        if indices is None:
            rows = jnp.broadcast_to(w, (n,) + w.shape)
        else:
            rows = w[safe] if num_sets else jnp.zeros((n,) + w.shape[1:], acc)
        t = jnp.einsum("...ki,nkc->nc...i", jnp.asarray(p.basis, acc), rows, precision="highest")
        for _ in range(p.order):
            t = jnp.einsum("nc...ji,ncj->nc...i", t, xa, precision="highest")
        out = out.at[:, :, p.out_start : p.out_start + p.ir_out.dim].add(t)
    if indices is not None and weights:
        out = jnp.where(in_range(indices, num_sets)[:, None, None], out, jnp.nan)
    return out.astype(x.dtype)


def equivariant_convolution(x, sh, weights, senders, receivers, plan: ConvolutionPlan,
                            avg_num_neighbors: float = 1.0) -> jax.Array:
    r"""``out[r, c, q] = (1 / avg) sum_{e: r_e = r} w[e, p(q), c] sum_ij T[i, j, q]
    x[s_e, c, i] sh[e, j]``, every edge message materialised; edges with a sender or
    receiver outside ``[0, N)`` contribute nothing."""
    acc = accumulation_dtype(x, sh, weights)
    num_nodes = x.shape[0]
    valid = edge_in_range(senders, receivers, num_nodes)
    # selected before any product, so that no derivative multiplies a dropped edge's data
    # (NaN for zero-length padding edges) by zero either
    drop = lambda a: jnp.where(valid.reshape((-1,) + (1,) * (a.ndim - 1)), a.astype(acc), 0)
    table = jnp.asarray(plan.table, acc)
    messages = jnp.einsum(
        "eci,ej,ijq->ecq", drop(x[jnp.clip(senders, 0, num_nodes - 1)]), drop(sh), table, precision="highest",
    )
    per_column = drop(weights)[:, jnp.asarray(plan.path_of_column), :]  # (E, Q, C)
    messages = messages * per_column.transpose(0, 2, 1)
    out = jnp.zeros((num_nodes,) + messages.shape[1:], acc).at[jnp.where(valid, receivers, 0)].add(messages)
    return (out / avg_num_neighbors).astype(x.dtype)


def segmented_polynomial(polynomial, inputs: Sequence, out_rows: Sequence[int], in_indices: Sequence,
                         out_indices: Sequence) -> list[jax.Array]:
    """A cuequivariance segmented polynomial (``e3kernels.cue``), path by path, on
    ``(B, size)`` inputs: each input gathered by its index (``None``: per row, or shared
    when ``B = 1``), every path's einsum of its coefficients and segments (the tensor
    product's subscripts, coefficient modes included) added to its output segment, each
    output scattered by its index (``None``: per row, or the sum over rows when
    ``out_rows`` is 1). Sums in float32 (float64 for float64 inputs); outputs of that
    dtype."""
    canonical = polynomial.consolidate()
    dtype = jnp.promote_types(jnp.float32, jnp.result_type(*inputs))
    gathered = [jnp.asarray(x, dtype) if i is None else jnp.asarray(x, dtype)[i]
                for x, i in zip(inputs, in_indices)]
    num_rows = max(x.shape[0] for x in gathered)
    gathered = [jnp.broadcast_to(x, (num_rows, x.shape[1])) for x in gathered]
    outs = [jnp.zeros((num_rows, op.size), dtype) for op in canonical.outputs]
    for operation, stp in canonical.operations:
        subscripts = stp.subscripts.operands
        for path in stp.paths:
            factors, terms, target = [], [], None
            for buffer, segment, modes in zip(operation.buffers, path.indices, subscripts):
                if buffer >= canonical.num_inputs:
                    target = (buffer - canonical.num_inputs, segment, modes)
                    continue
                op = canonical.inputs[buffer]
                factors.append(gathered[buffer][:, op.segment_slices()[segment]].reshape(
                    (num_rows,) + op.segments[segment]))
                terms.append("N" + modes)
            o, segment, modes = target
            if not factors:  # a constant term: the coefficients spread over the output's modes
                factors = [jnp.ones((num_rows,) + canonical.outputs[o].segments[segment], dtype)]
                terms = ["N" + modes]
            value = jnp.einsum(",".join([stp.coefficient_subscripts] + terms) + "->N" + modes,
                               jnp.asarray(path.coefficients, dtype), *factors,
                               precision=jax.lax.Precision.HIGHEST)
            outs[o] = outs[o].at[:, canonical.outputs[o].segment_slices()[segment]].add(
                value.reshape(num_rows, -1))
    results = []
    for o, rows in enumerate(outs):
        if out_indices[o] is not None:
            rows = jax.ops.segment_sum(rows, out_indices[o], num_segments=out_rows[o])
        elif out_rows[o] == 1 and num_rows > 1:
            rows = jnp.sum(rows, axis=0, keepdims=True)
        results.append(rows)
    return results
