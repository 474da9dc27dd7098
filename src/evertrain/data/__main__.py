"""python -m evertrain.data FILE [options]: the same as `evertrain check FILE`."""

import sys

from evertrain.cli import main

sys.exit(main(["check", *sys.argv[1:]]))
