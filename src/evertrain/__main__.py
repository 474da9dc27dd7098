"""`python -m evertrain ...` is the `evertrain` command (what `accelerate launch -m evertrain` runs).

    python -m evertrain train --dataset FILE --output-dir DIR
"""

import sys

from evertrain.cli import command

sys.exit(command())
