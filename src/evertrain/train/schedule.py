"""Learning-rate schedules that need no total length, because the run never ends.

The multiplier is a pure function of the global step (and, for wsd, of where a requested decay began),
so the first step of a new file gets exactly what the schedule gives at that step: no jump, ever.

    python -m evertrain.schedule wsd 10     # print a few values
"""

from __future__ import annotations

import math


def lr_factor(name: str, step: int, warmup: int, decay_start: int | None = None, decay_steps: int = 0) -> float:
    """Multiplier of the peak learning rate for the optimizer step that follows `step` completed steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    if name == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / (step + 1))
    if name == "wsd":
        if decay_start is None or step < decay_start:
            return 1.0
        done = step - decay_start + 1
        return max(0.0, 1.0 - done / max(decay_steps, 1))
    raise ValueError(f"unknown learning-rate schedule {name!r}")


if __name__ == "__main__":
    import sys

    name, warm = sys.argv[1], int(sys.argv[2])
    print([round(lr_factor(name, s, warm, 3 * warm, warm), 3) for s in range(5 * warm)])
