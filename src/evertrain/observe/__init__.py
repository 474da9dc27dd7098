"""Everything that watches training without steering it: metrics and trackers, held-out evaluations, the anchor
set, evolution snapshots, the forgetting gate, the trace.

The training loop calls `Observers` (observers.py) at three moments, by name: a file starts (`file_started`), an optimizer step
ends (`step_ended`), a file ends (`file_ended`). It hands each what it needs (the model, the progress, the file,
the step's record) and gets numbers or a verdict back. The observers keep their own state (the snapshot budget,
the gate's last measurement, the anchor set they read) and never write into the training session; what of it a
resume needs is `state_dict`, saved with every checkpoint beside the training progress.

    observers.py  the seam the loop calls, at its three moments
    metrics.py    logs/metrics.jsonl, the console's step lines, the trackers (TensorBoard, wandb, ...)
    evals.py      held-out slices and the forgetting matrix (`evertrain report`)
    anchor.py     the base model's own answers, to measure (and rehearse) drift from it
    snapshots.py  what the model guesses for a few tracked examples, step after step
    gate.py       after each file: did it raise what earlier files taught? (forgetting_action)
    trace.py      which lines every optimizer step trained: the evidence of exactly-once

    evertrain train --dataset FILE --output-dir DIR --trace     # then: evertrain report DIR; evertrain dashboard DIR
"""
