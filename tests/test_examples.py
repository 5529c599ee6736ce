"""The examples run, at tiny sizes: examples/train_mace.py trains, writes its files, its
trained model's forces pass the finite-difference check, and a second run loads its
programs from JAX's persistent compilation cache."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_train_mace(tmp_path):
    """Twice, as a user runs it, with JAX's persistent compilation cache: the first run
    compiles and trains, the second loads every program from the cache."""
    argv = ["--steps", "3", "--atoms", "8", "--structures", "4", "--channels", "8", "--l-max", "1",
            "--correlation", "2", "--interactions", "1", "--compilation-cache", str(tmp_path / "cache")]
    for run in ("first", "second"):
        # a process each: JAX reads its cache settings once, at its first compile
        command = [sys.executable, str(EXAMPLES / "train_mace.py"), *argv, "--out", str(tmp_path / run)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr  # 1: the finite-difference check failed

    out = tmp_path / "first"
    with open(out / "loss.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["step"]) for row in rows] == [1, 2, 3]
    assert all(math.isfinite(float(row["train_loss"])) for row in rows)
    assert math.isfinite(float(rows[-1]["test_loss"]))  # the test set is evaluated at the last step
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finite_difference_ok"] and summary["finite_difference_max_deviation"] < 1e-5
    assert all(math.isfinite(summary[part]["force_mae_mev_per_a"]) for part in ("train", "test"))
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert summary["compilation_cache"]["misses"] > 0

    second = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert second["compilation_cache"]["misses"] == 0 and second["compilation_cache"]["hits"] > 0
    assert second["test"] == summary["test"]  # the same run, from the same programs
