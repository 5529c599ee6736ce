"""Reference (pure jax.numpy) species-indexed linear map. TEMPORARY simple version."""

from __future__ import annotations

import jax.numpy as jnp

from e3kernels.irreps import LinearPlan


def indexed_linear(x, weights, biases, indices, *, plan: LinearPlan):
    n = x.shape[0]
    out = jnp.zeros((n, plan.dim_out), x.dtype)
    for b, w in zip(plan.blocks, weights):
        xb = x[:, b.in_start : b.in_start + b.mul_in * b.ir_dim].reshape(n, b.mul_in, b.ir_dim)
        yb = b.path_weight * jnp.einsum("nuw,num->nwm", w[indices], xb)
        out = out.at[:, b.out_start : b.out_start + b.mul_out * b.ir_dim].add(yb.reshape(n, b.mul_out * b.ir_dim))
    for b, w in zip(plan.biases, biases):
        out = out.at[:, b.out_start : b.out_start + b.mul].add(b.path_weight * w[indices])
    s = weights[0].shape[0] if weights else (biases[0].shape[0] if biases else None)
    if s is not None:
        valid = (indices >= 0) & (indices < s)
        out = jnp.where(valid[:, None], out, jnp.nan)
    return out
