"""symmetric_contraction's Triton kernels run for real on a CUDA GPU (``make gpu-check``; not CI).

Forward, gradients and second-order gradients against the reference at several sizes, MACE-M
(N = 4000, C = 128, 10 species) included, bf16, out-of-range indices, and a timing report
(compile and run times, printed with ``-s``). The reference runs with float32 matmuls (no
TF32) on chunks of rows: every quantity checked is per row or a sum over rows, and the
placeholder reference materialises ``(rows, C, 16**3, 3)`` arrays.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernel_symmetric_contraction import (
    MACE_M,
    Case,
    all_orders,
    assert_matches,
    first_order,
    inputs,
    kernel_fn,
    reference_fn,
)

from e3kernels.kernels import symmetric_contraction as kernels

pytestmark = pytest.mark.skipif(
    jax.devices()[0].platform != "gpu",
    reason=f"needs a CUDA GPU; the default JAX device is {jax.devices()[0].platform}",
)

SIZES = {
    "odd": Case("0e + 1o + 2e", (1, 2, 3), "0e + 1o", 1037, 3, 3),
    "100-channels-order-4": Case("0e + 1o", (1, 2, 4), "0e + 1o + 2e", 333, 100, None),
    "96-channels-no-keep": Case("2x0e + 1o", (1, 2, 3), None, 517, 96, 5),
}
ROWS_PER_CHUNK = 200


def cotangent_for(case: Case):
    return jax.random.normal(jax.random.PRNGKey(5), (case.rows, case.channels, case.plan.dim_out))


def kernel_values(case: Case, derivatives, x, w, i, cotangent):
    return jax.jit(derivatives(kernel_fn(case, kernels.TRITON), i, cotangent))(x, w)


def reference_values(case: Case, derivatives, x, w, i, cotangent):
    """``derivatives`` of the reference, evaluated ``ROWS_PER_CHUNK`` rows at a time; the
    weights' parts (the second element of each gradient pair) summed over chunks."""
    f = derivatives(reference_fn(case), i, cotangent)
    if case.rows % ROWS_PER_CHUNK:
        with jax.default_matmul_precision("float32"):
            return jax.jit(f)(x, w)
    chunk = lambda a: None if a is None else a.reshape((-1, ROWS_PER_CHUNK) + a.shape[1:])

    def per_chunk(args):
        x_c, i_c, cot_c = args
        with jax.default_matmul_precision("float32"):
            return derivatives(reference_fn(case), i_c, cot_c)(x_c, w)

    stacked = jax.jit(lambda: jax.lax.map(per_chunk, (chunk(x), chunk(i), chunk(cotangent))))()
    return _combine_chunks(stacked)


def _combine_chunks(stacked):
    """Per-row arrays re-joined; weight gradients (lists) summed."""
    rows = lambda a: a.reshape((-1,) + a.shape[2:])
    if not isinstance(stacked, tuple):
        return rows(stacked)
    out, *grads = stacked
    return (rows(out),) + tuple((rows(gx), [jnp.sum(g, axis=0) for g in gw]) for gx, gw in grads)


def compare(case: Case, derivatives, dtype=jnp.float32, tol=1e-5, ours=None):
    x, w, i = inputs(case)
    cotangent = cotangent_for(case)
    if ours is None:
        low = jax.tree.map(lambda a: a.astype(dtype), (x, w))
        ours = kernel_values(case, derivatives, *low, i, cotangent.astype(dtype))
    expected = reference_values(case, derivatives, x, w, i, cotangent)
    for order, (a, b) in enumerate(zip(ours, expected)):
        assert_matches(a, b, rtol=tol * (10 if order == 2 else 1), what=f"order {order}")


def mace_m_program(derivatives):
    """The compiled MACE-M (indexed) program."""
    x, w, i = inputs(MACE_M)
    fn = derivatives(kernel_fn(MACE_M, kernels.TRITON), i, cotangent_for(MACE_M))
    return jax.jit(fn).lower(x, w).compile()


@pytest.mark.parametrize("size", SIZES)
def test_float32_to_second_order(size):
    compare(SIZES[size], all_orders, tol=2e-5)


def test_mace_m_shared_weights_gradients():
    compare(dataclasses.replace(MACE_M, num_indexed=None), first_order, tol=2e-5)


def test_mace_m_indexed_to_second_order():
    x, w, _ = inputs(MACE_M)
    compare(MACE_M, all_orders, tol=2e-5, ours=mace_m_program(all_orders)(x, w))


def test_bfloat16_at_mace_m():
    compare(MACE_M, first_order, dtype=jnp.bfloat16, tol=3e-2)


def test_out_of_range_indices_give_nan_rows():
    indices = np.random.default_rng(0).integers(-2, 12, MACE_M.rows)  # 10 sets: ~30% invalid
    x, w, _ = inputs(MACE_M)
    out = np.asarray(jax.jit(kernel_fn(MACE_M, kernels.TRITON))(x, w, jnp.asarray(indices, jnp.int32)))
    invalid = (indices < 0) | (indices >= 10)
    assert np.all(np.isnan(out[invalid])) and np.all(np.isfinite(out[~invalid]))
