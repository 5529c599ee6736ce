"""indexed_linear's Triton kernels run for real on a CUDA GPU (``make gpu-check``; not CI).

Forward, gradients and second-order gradients against the reference at several sizes,
the MACE size included, plus a timing report (printed with ``-s``). The reference runs
with float32 matmuls (no TF32), as the kernels do by default.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernel_indexed_linear import MACE, Case, evaluate

from e3kernels.kernels import indexed_linear as kernels
from e3kernels.reference.indexed_linear import indexed_linear as reference

HIGHEST = jax.lax.Precision.HIGHEST

pytestmark = pytest.mark.skipif(
    jax.devices()[0].platform != "gpu",
    reason=f"needs a CUDA GPU; the default JAX device is {jax.devices()[0].platform}",
)

SIZES = {
    "mace": dict(irreps_in=MACE, irreps_out=MACE, num_sets=10, num_rows=4000),
    "mace-89-species": dict(irreps_in="128x0e + 128x1o", irreps_out="128x0e + 128x1o", num_sets=89,
                            num_rows=4000, biases=True),
    "odd": dict(irreps_in="3x0e + 5x1o + 100x2e + 2x0e", irreps_out="4x0e + 96x1o + 2x1e + 150x2e",
                num_sets=3, num_rows=1037, biases=True, simplify_irreps_internally=False,
                force_irreps_out=True),
    "one-set": dict(irreps_in="96x0e + 3x1o", irreps_out="100x0e + 7x1o", num_sets=1, num_rows=333),
}


def assert_relatively_close(actual, expected, tol):
    """``max |a - b| <= tol * max(1, max |b|)`` per leaf; NaN where the reference has NaN."""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree_util.tree_leaves(expected)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        name = jax.tree_util.keystr(path)
        assert a.shape == b.shape, name
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
        scale = max(1.0, float(np.nanmax(np.abs(b), initial=0.0)))
        error = float(np.nanmax(np.abs(a - b), initial=0.0))
        assert error <= tol * scale, f"{name}: max error {error:.3g} vs scale {scale:.3g}"


def compare(case: Case, order: int, tol: float):
    with jax.default_matmul_precision("float32"):
        impl = kernels.implementations(case.plan, HIGHEST, jnp.float32)["gpu"]
        ours = evaluate(impl, case, order, compiler_options={})
        expected = evaluate(functools.partial(reference, plan=case.plan, precision=HIGHEST), case, order,
                            compiler_options={})
    assert_relatively_close(ours, expected, tol)


@pytest.mark.parametrize("size", SIZES)
def test_float32_matches_reference(size):
    compare(Case(**SIZES[size]), order=2, tol=1e-5)


def test_bfloat16_at_mace_size():
    compare(Case(**SIZES["mace"], dtype=jnp.bfloat16), order=1, tol=3e-2)


def test_out_of_range_indices():
    indices = np.random.default_rng(0).integers(-2, 12, 4000)  # 10 sets: ~30% invalid
    compare(Case(**SIZES["mace"], indices=indices), order=2, tol=1e-5)
