"""mace-jax's own cuequivariance adapters, unmodified, run plain and inside
``e3kernels.cue.routed``: values and gradients, and which e3kernels op each call became.

mace-jax is not on PyPI, so this checks a checkout of it (its ``mace_jax`` package on
``sys.path``). Its training-only imports (gin, tqdm, wandb, h5py, matscipy, roundmantissa)
are stubbed, and the tensor product uses ``cue.O3`` (mace-jax's default group reads its
Clebsch-Gordan tables from PyTorch's e3nn).

    python -m bench.mace_jax_adapters /path/to/mace-jax    # exits 1 on a mismatch
"""

from __future__ import annotations

import sys
import types

#: imports of mace_jax's training code that its adapters do not use
TRAINING_ONLY = ("gin", "gin.config", "tqdm", "tqdm.auto", "wandb", "h5py", "matscipy",
                 "matscipy.neighbours", "roundmantissa")


class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub(name)

    def __call__(self, *args, **kwargs):  # decorators return what they decorate
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else _Stub("result")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    sys.path.insert(0, argv[0])
    for name in TRAINING_ONLY:
        sys.modules.setdefault(name, _Stub(name))

    import cuequivariance as cue
    import jax
    import jax.numpy as jnp
    import numpy as np
    from e3nn_jax import Irreps
    from flax import nnx
    from mace_jax.adapters.cuequivariance import (
        FullyConnectedTensorProduct,
        Linear,
        SymmetricContraction,
        TensorProduct,
    )
    from mace_jax.adapters.cuequivariance.tensor_product import _expected_channelwise_instructions

    from e3kernels import cue as e3cue

    rng = np.random.default_rng(0)
    nodes, edges, channels = 6, 20, 8
    node = Irreps(f"{channels}x0e + {channels}x1o")
    sh_irreps = Irreps("0e + 1o + 2e + 3o")
    message = Irreps(" + ".join(f"{channels}x{ir}" for ir in ("0e", "1o", "2e", "3o")))
    x = jnp.asarray(rng.normal(size=(nodes, node.dim)), jnp.float32)
    sh = jnp.asarray(rng.normal(size=(edges, sh_irreps.dim)), jnp.float32)
    edge_index = jnp.asarray(rng.integers(0, nodes, (2, edges)), jnp.int32)
    species = jnp.asarray(rng.integers(0, 3, nodes), jnp.int32)
    ops = ("equivariant_convolution", "indexed_linear", e3cue.OP)
    failures = 0

    def check(name, fn, *args):
        nonlocal failures

        def routed(*a):
            with e3cue.routed(unsupported="cuex"):
                return fn(*a)

        def grad(f):
            return jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))))(*args)

        jaxpr = str(jax.make_jaxpr(routed)(*args))
        ran = [op for op in ops if f"name='{op}'" in jaxpr] or ["e3kernels.cue (XLA's own ops)"]
        ran += ["cuex (not routed)"] if "method=" in jaxpr else []  # a call left on cuex
        value_error = float(jnp.max(jnp.abs(jax.jit(fn)(*args) - jax.jit(routed)(*args))))
        grad_error = float(jnp.max(jnp.abs(grad(fn) - grad(routed))))
        ok = value_error < 1e-4 and grad_error < 1e-4
        failures += not ok
        print(f"{name}: {', '.join(ran)}; max |difference| value {value_error:.1e}, gradient "
              f"{grad_error:.1e}{'' if ok else '  MISMATCH'}")

    irreps_out, _ = _expected_channelwise_instructions(node, sh_irreps, message)
    for fusion in (False, True):
        tp = TensorProduct(node, sh_irreps, irreps_out, shared_weights=False, internal_weights=False,
                           conv_fusion=fusion, group=cue.O3, rngs=nnx.Rngs(0))
        w = jnp.asarray(rng.normal(size=(edges, tp.weight_numel)), jnp.float32)
        if fusion:
            check("TensorProduct (conv_fusion)", lambda x, sh, w, tp=tp: tp(x, sh, w, edge_index=edge_index),
                  x, sh, w)
        else:
            check("TensorProduct", lambda x, sh, w, tp=tp: tp(x[edge_index[0]], sh, w), x, sh, w)
    linear = Linear(node, node, rngs=nnx.Rngs(0))
    check("Linear", lambda x: linear(x), x)
    readout = Linear(Irreps(f"{channels}x0e"), Irreps("0e"), rngs=nnx.Rngs(0))
    check("Linear (scalar readout)", lambda x: readout(x[:, :channels]), x)
    contraction = SymmetricContraction(message, node, correlation=3, num_elements=3, rngs=nnx.Rngs(0))
    features = jnp.asarray(rng.normal(size=(nodes, message.dim)) / 2, jnp.float32)
    check("SymmetricContraction", lambda x: contraction(x, species), features)
    skip = FullyConnectedTensorProduct(node, Irreps("3x0e"), node, rngs=nnx.Rngs(0))
    check("FullyConnectedTensorProduct", lambda x: skip(x, jax.nn.one_hot(species, 3)), x)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
