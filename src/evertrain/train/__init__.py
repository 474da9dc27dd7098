"""Training: one run that never ends, fed one file at a time.

    session.py     the Session (what training holds from one file to the next) and what `fit` hands back
    setup.py       the accelerator, the model and optimizer, new or resumed from a checkpoint
    loop.py        `fit`: one file, one optimizer step at a time, yielding to its caller after each
    objectives.py  the loss of one micro-batch
    saving.py      writing a checkpoint (while training waits, or by a thread), the RNG
    rollback.py    back to a checkpoint: after a NaN loss, or when the forgetting gate refuses a file
    driver.py      one file from its path to its outcome, for `train` and the daemon alike
    checkpoint.py  checkpoints on disk: atomic commit, manifest, verify, prune (readers only read)
    state.py       TrainingProgress: all a resume needs, saved with every checkpoint
    schedule.py    learning-rate schedules on the global step; replay.py, sharding.py, chunked_loss.py

    evertrain train --dataset FILE --output-dir DIR
"""
