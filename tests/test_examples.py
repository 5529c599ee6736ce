"""The examples run, at tiny sizes: examples/train_mace.py trains, writes its files, and its
trained model's forces pass the finite-difference check."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_mace(tmp_path):
    train_mace = load("train_mace")
    argv = ["--steps", "3", "--atoms", "8", "--structures", "4", "--channels", "8", "--l-max", "1",
            "--correlation", "2", "--interactions", "1", "--out", str(tmp_path)]
    assert train_mace.main(argv) == 0  # non-zero: the finite-difference check failed

    with open(tmp_path / "loss.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["step"]) for row in rows] == [1, 2, 3]
    assert all(math.isfinite(float(row["train_loss"])) for row in rows)
    assert math.isfinite(float(rows[-1]["test_loss"]))  # the test set is evaluated at the last step
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["finite_difference_ok"] and summary["finite_difference_max_deviation"] < 1e-5
    assert all(math.isfinite(summary[part]["force_mae_mev_per_a"]) for part in ("train", "test"))
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
