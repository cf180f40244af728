# `python -m launch ...` is `cpdit-launch ...` (torchrun workers run this module).
from launch.cli import run

run()
