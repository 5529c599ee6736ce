"""Data-parallel training on 2 processes (``jax.distributed`` on localhost, CPU): one
step's loss and gradients equal the one-process result."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    from data_parallel_model import inputs, step

    here = Path(__file__).parent
    port = _free_port()
    outs = [tmp_path / f"process{i}.npz" for i in range(2)]
    logs = [open(tmp_path / f"process{i}.log", "w") for i in range(2)]
    workers = [
        subprocess.Popen([sys.executable, str(here / "distributed_worker.py"), str(i), str(port), str(out)],
                         cwd=here, stdout=log, stderr=subprocess.STDOUT)
        for i, (out, log) in enumerate(zip(outs, logs))
    ]
    try:
        codes = [w.wait(timeout=TIMEOUT_S) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        for log in logs:
            log.close()
    for i, code in enumerate(codes):
        log = (tmp_path / f"process{i}.log").read_text()
        assert code == 0, f"process {i} exited with {code}:\n{log[-3000:]}"

    loss, grads = step(*inputs())
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    expected = {"loss": loss, **{jax.tree_util.keystr(k): v for k, v in leaves}}
    for out in outs:
        got = np.load(out)
        assert sorted(got.files) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], np.asarray(value), rtol=2e-4, atol=2e-5, err_msg=name)
