"""The exit codes of every evertrain command, in one table (README's "Exit codes" lists the same).

    evertrain train --dataset F --output-dir D; echo $?
"""

OK = 0            # the work asked for was done
FAILED = 1        # an unexpected error (a traceback says where)
BAD_INPUT = 2     # bad data or settings, a run mismatch, the folder in use by another evertrain process, a damaged
                  # or lost ledger (`evertrain repair`), checkpoints of which none loads (`--from-base`)
DUPLICATE = 3     # `train`: this content was already trained in this run (--allow-repeat to train it again)
GUARD = 4         # `train`: trained but NOT done (a guard failed, a non-finite loss was rolled back, or the
                  # reference of a file of judgments was lost mid-file)
FILES_FAILED = 5   # `run --once`: at least one file failed (its summary line and failed/NAME.error.txt say why)
DISK_FULL = 6     # `train`: out of space (the newest complete checkpoint kept, the partial one removed; free space
                  # and run it again to resume); `run --once`: left with the disk too full to go on
REJECTED = 7      # `train`: the forgetting gate rejected the file (forgetting_action rollback or retry): the run is
                  # back at the checkpoint before it, the file recorded as rejected with the measured rises
INTERRUPTED = 130  # `train`: stopped by SIGINT/SIGTERM at a step boundary, checkpointed; run it again to resume
