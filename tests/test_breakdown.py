"""bench.breakdown: a compiled program's time by part, from XLA's per-instruction profile."""

import jax
import jax.numpy as jnp
import pytest

from bench import breakdown


@pytest.mark.parametrize(("name_stack", "part"), [
    ("jit(loss)/jvp(mace)/edge_embedding/norm", "spherical harmonics + radial embedding"),
    ("jit(f)/transpose(jvp(mace))/message_passing_convolution/multi_layer_perceptron/dot_general",
     "radial network"),
    ("jit(f)/jvp(mace)/message_passing_convolution/e3kernels_call/while", "convolution"),
    ("jit(f)/jvp(mace)/vmap(symmetric_tensor_product)/dot_general", "symmetric contraction"),
    ("jit(f)/jvp(jvp(mace))/linear_down/dot_general", "Linears"),
    ("jit(f)/jvp(mace)/add_any", "rest"),
    ("", "rest"),
])
def test_mace_parts_from_name_stacks(name_stack, part):
    assert breakdown.mace_part(name_stack) == part


def test_time_goes_to_the_part_that_spends_it():
    """A big matmul in one named scope and a cheap op in another: the matmul's part takes
    most of the time; a loop's own instructions (its counter, without a name stack of their
    own) count for the loop's part, not for "rest"."""

    def f(a, b):
        with jax.named_scope("message_passing_convolution"):
            big = jnp.tanh(a @ b @ b)
        with jax.named_scope("linear_up"):
            small = a[:64, :64] @ b[:64, :64]
        with jax.named_scope("symmetric_tensor_product"):
            looped = jax.lax.fori_loop(0, 2000, lambda i, x: x * 0.999 + 1e-3, a[0, :4])
        return big, small, looped  # separate outputs: XLA fuses none of the three together

    a = jnp.ones((384, 384))
    compiled = jax.jit(f).lower(a, a).compile()
    stacks = {stack for _, stack in breakdown.instructions(compiled).values()}
    assert any("message_passing_convolution" in s for s in stacks)
    seconds = breakdown.breakdown(compiled, (a, a), runs=3)
    assert set(seconds) == set(breakdown.MACE_PARTS)
    total = sum(seconds.values())
    assert seconds["convolution"] > 0.5 * total, seconds
    assert seconds["Linears"] > 0 and seconds["symmetric contraction"] > 0, seconds
    assert seconds["symmetric contraction"] > seconds["rest"], seconds
    assert "convolution" in breakdown.table({("ours", "fwd"): seconds})
