"""Reference (pure jax.numpy) symmetric contraction. TEMPORARY simple version."""

from __future__ import annotations

import jax.numpy as jnp

from e3kernels.irreps import SymmetricPlan


def symmetric_contraction(x, weights, indices, *, plan: SymmetricPlan):
    n, c, _ = x.shape
    out = jnp.zeros((n, c, plan.dim_out), x.dtype)
    for p, w in zip(plan.paths, weights):
        u = jnp.asarray(p.basis, x.dtype)
        w_rows = w[indices] if indices is not None else jnp.broadcast_to(w, (n,) + w.shape)
        t = jnp.einsum("...ki,nkc->nc...i", u, w_rows)
        for _ in range(p.order):
            t = jnp.einsum("nc...j i,ncj->nc...i".replace(" ", ""), t, x)
        out = out.at[:, :, p.out_start : p.out_start + p.ir_out.dim].add(t)
    if indices is not None and weights:
        s = weights[0].shape[0]
        out = jnp.where(((indices >= 0) & (indices < s))[:, None, None], out, jnp.nan)
    return out
