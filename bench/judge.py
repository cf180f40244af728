# The command line of the sample judge, launch/job/judge.py (the training job scores its validation samples with it):
#
#   python bench/judge.py runs/default/samples            # every *.gif under it, prompt read from the file name
#   python bench/judge.py --i2v PROMPTS runs/i2v-demo/samples   # image<TAB>prompt lines; sample k is kkk_*.gif
#   python bench/judge.py --validate                       # ground-truth clips (all right) and noise (all wrong)
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.job.judge import main, print_table, read_frames, read_i2v_samples, score, score_i2v  # noqa: E402, F401

if __name__ == "__main__":
    sys.exit(main())
