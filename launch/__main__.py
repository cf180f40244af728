# `python -m launch ...` is `cpdit-launch ...` (torchrun workers run this module).
import sys

from launch.cli import main

sys.exit(main())
