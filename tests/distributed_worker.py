"""One process of test_multi_process.py: ``python distributed_worker.py ID PORT OUT``.

Joins a 2-process JAX runtime on 127.0.0.1 (one CPU device each, Gloo collectives), runs
one data-parallel training step of ``data_parallel_model`` with the atoms split over the
processes, and saves the loss and gradients it sees to ``OUT`` (an ``.npz``).
"""

from __future__ import annotations

import os
import sys


def main(process_id: int, port: int, out: str) -> None:
    # one CPU device per process; set here, not at import (pytest imports this module
    # for its doctests, in a process whose JAX must keep 4 devices)
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=60)
    from data_parallel_model import inputs, step

    assert jax.process_count() == 2 and len(jax.devices()) == 2, jax.devices()
    mesh = jax.make_mesh((2,), ("rows",), axis_types=(jax.sharding.AxisType.Auto,))

    def global_array(value, spec):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec), lambda i: value[i])

    params, *per_atom = inputs()
    params = jax.tree.map(lambda p: global_array(p, P()), params)
    per_atom = [global_array(a, P("rows")) for a in per_atom]
    loss, grads = step(params, *per_atom)
    local = lambda a: np.asarray(a.addressable_data(0))  # replicated: every process has all
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    np.savez(out, loss=local(loss), **{jax.tree_util.keystr(k): local(v) for k, v in leaves})
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
