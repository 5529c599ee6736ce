"""On TPU, no Mosaic kernel keeps an array that grows with the edges or rows in SMEM.

SMEM has 1 MiB: index data per edge or row there (scalar prefetch) stopped the convolution
from compiling past ~150,000 edges. Each kernel's SMEM operands (scalar prefetch, blocked
SMEM inputs, SMEM scratch) are in the signature of the Mosaic module that its
``tpu_custom_call`` carries, so lowering for TPU, which needs no TPU, shows their sizes: at a
million edges or rows, forward and gradient, none may exceed :data:`MAX_SMEM_ELEMENTS`.
"""

from __future__ import annotations

import base64
import json
import math
import re

import jax
import jax.numpy as jnp
import pytest
from jaxlib.mlir import ir
from jaxlib.mosaic.python import tpu

from e3kernels import ops

MAX_SMEM_ELEMENTS = 4096
MILLION = 1_000_000
SPECIES = 10
f32 = jnp.float32


def largest_smem_operands(lowered) -> dict[str, int]:
    """Per kernel name: the most elements of an SMEM memref in its Mosaic modules."""
    sizes: dict[str, int] = {}
    context = ir.Context()
    context.allow_unregistered_dialects = True
    tpu.register_dialect(context)
    for call in _tpu_custom_calls(lowered.compiler_ir("stablehlo").operation):
        config = json.loads(ir.StringAttr(call.attributes["backend_config"]).value)
        with context:
            module = ir.Module.parse(base64.b64decode(config["custom_call_config"]["body"]))
        name = ir.StringAttr(call.attributes["kernel_name"]).value
        shapes = re.findall(r"memref<((?:\d+x)*)[a-z]\w*, #tpu\.memory_space<smem>>", str(module))
        elements = [math.prod(int(d) for d in shape.split("x") if d) for shape in shapes]
        sizes[name] = max([sizes.get(name, 0)] + elements)
    return sizes


def _tpu_custom_calls(operation):
    for region in operation.regions:
        for block in region.blocks:
            for op in block.operations:
                if op.operation.name == "stablehlo.custom_call" and (
                    ir.StringAttr(op.attributes["call_target_name"]).value == "tpu_custom_call"
                ):
                    yield op
                yield from _tpu_custom_calls(op.operation)


def _convolution():
    """MACE-M's second interaction: 128x(0e+1o) with l <= 3 harmonics, 30 edges per node."""
    plan = ops.convolution_plan("0e + 1o", "0e + 1o + 2e + 3o", "0e + 1o + 2e + 3o")
    nodes, channels = MILLION // 30, 128
    args = (jax.ShapeDtypeStruct((nodes, channels, plan.dim_in), f32),
            jax.ShapeDtypeStruct((MILLION, plan.dim_sh), f32),
            jax.ShapeDtypeStruct((MILLION, plan.num_paths, channels), f32),
            jax.ShapeDtypeStruct((MILLION,), jnp.int32), jax.ShapeDtypeStruct((MILLION,), jnp.int32))

    def f(x, sh, weights, senders, receivers):
        return ops.equivariant_convolution(x, sh, weights, senders, receivers, plan, avg_num_neighbors=30.0,
                                           backend="pallas")

    names = {"convolution_node_partial", "convolution_weights_partial", "convolution_sh_partial"}
    return f, args, 3, names


def _fused_convolution():
    """The same with fused radial weights (64 hidden units): the hidden and matrix partials."""
    plan = ops.convolution_plan("0e + 1o", "0e + 1o + 2e + 3o", "0e + 1o + 2e + 3o")
    nodes, channels, hidden = MILLION // 30, 128, 64
    args = (jax.ShapeDtypeStruct((nodes, channels, plan.dim_in), f32),
            jax.ShapeDtypeStruct((MILLION, plan.dim_sh), f32),
            jax.ShapeDtypeStruct((MILLION, hidden), f32),
            jax.ShapeDtypeStruct((hidden, plan.num_paths * channels), f32),
            jax.ShapeDtypeStruct((MILLION,), jnp.int32), jax.ShapeDtypeStruct((MILLION,), jnp.int32))

    def f(x, sh, h, matrix, senders, receivers):
        return ops.equivariant_convolution(x, sh, ops.RadialWeights(h, matrix), senders, receivers, plan,
                                           avg_num_neighbors=30.0, backend="pallas")

    names = {"convolution_node_partial", "convolution_hidden_partial", "convolution_matrix_partial",
             "convolution_sh_partial"}
    return f, args, 4, names


def _indexed_linear():
    plan = ops.linear_plan("128x0e + 128x1o", "128x0e + 128x1o")
    args = (jax.ShapeDtypeStruct((MILLION, plan.dim_in), f32),
            [jax.ShapeDtypeStruct(s, f32) for s in plan.weight_shapes(SPECIES)],
            jax.ShapeDtypeStruct((MILLION,), jnp.int32))

    def f(x, w, i):
        return ops.indexed_linear(x, w, i, plan, backend="pallas")

    return f, args, 2, {"indexed_linear_tpu", "indexed_linear_weight_grad_tpu"}


def _symmetric_contraction():
    plan = ops.symmetric_contraction_plan("0e + 1o", (1, 2, 3), keep_irrep_out="0e + 1o")
    channels = 8
    args = (jax.ShapeDtypeStruct((MILLION, channels, plan.dim_in), f32),
            [jax.ShapeDtypeStruct((SPECIES, p.mul, channels), f32) for p in plan.paths],
            jax.ShapeDtypeStruct((MILLION,), jnp.int32))

    def f(x, w, i):
        return ops.symmetric_contraction(x, w, plan, indices=i, backend="pallas")

    return f, args, 2, {"sparse_polynomial", "sparse_row_reduction"}


OPS = {"convolution": _convolution, "fused convolution": _fused_convolution,
       "indexed_linear": _indexed_linear, "symmetric_contraction": _symmetric_contraction}


@pytest.mark.parametrize("op", OPS)
def test_smem_does_not_grow_with_rows(op):
    """Forward, gradient and second order (the gradient of a loss on the input gradient,
    as force training has)."""
    f, args, differentiable, names = OPS[op]()
    energy = lambda *a: jnp.sum(jnp.sin(f(*a)))
    wrt = tuple(range(differentiable))
    force_loss = lambda *a: jnp.sum(jnp.sin(jax.grad(energy)(*a)))
    sizes = {}
    for fn in (f, jax.grad(energy, argnums=wrt), jax.grad(force_loss, argnums=wrt)):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",))
        sizes.update(largest_smem_operands(lowered))
    assert names <= set(sizes), sorted(sizes)  # every kernel of the op was looked at
    too_large = {name: size for name, size in sizes.items() if size > MAX_SMEM_ELEMENTS}
    assert not too_large, f"SMEM operands growing with the rows: {too_large}"
