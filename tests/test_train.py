"""train.py: the training comparison runs end to end (CPU: SDPA only, tiny model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_training_run_learns(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train.py"), "--steps", "30", "--tiny", "--out", str(tmp_path)],
        check=True,
    )
    runs = json.loads((tmp_path / "train.json").read_text())["runs"]
    losses = runs[-1]["losses"]
    assert len(losses) == 30 and all(x == x for x in losses)  # no NaN
    assert losses[0] > 5.0 and sum(losses[-5:]) / 5 < losses[0] - 1.0  # from ~ln 256 down
