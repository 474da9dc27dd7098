import sys

from evertrain.cli import main

sys.exit(main())
