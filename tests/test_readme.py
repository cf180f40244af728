# Every command README.md shows is run somewhere: the two set-up commands by .ci/run (in a fresh virtual
# environment, read out of README.md), the configuration examples here (as written, shortened by overrides
# appended after them), and each launcher line by the test file named beside it.
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from job_helpers import ENV

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SHORT = [
    "train.steps=2",
    "sample.num_steps=2",
    "train.export=false",
    "logging.wandb=false",
    "checkpoint.every=0",
    "sample.prompts=[a red circle moving left]",
]


def bash_blocks() -> list[list[str]]:
    return [[ln for ln in b.strip().splitlines() if ln.strip()] for b in re.findall(r"```bash\n(.*?)```", README, re.S)]


def test_ci_runs_the_two_setup_commands():
    setup = [ln for b in bash_blocks() for ln in b if ln.startswith("(python -c 'import torch'")]
    assert len(setup) == 2, setup
    assert setup[0].endswith("cpdit-launch train") and setup[1].endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m venv" in ci and "grep -E \"^\\(python -c 'import torch'\" README.md" in ci


CONFIG_EXAMPLES = [ln for b in bash_blocks() for ln in b if ln.startswith("cpdit-launch ") and " plan " not in ln]
PLAN_EXAMPLES = [ln for b in bash_blocks() for ln in b if ln.startswith("cpdit-launch plan ")]


def test_readme_has_configuration_examples():
    assert len(CONFIG_EXAMPLES) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("command", CONFIG_EXAMPLES)
def test_configuration_example_runs(tmp_path, command):
    argv = shlex.split(command)
    cmd = [sys.executable, "-m", "launch", *argv[1:], *SHORT, f"train.output_dir={tmp_path}"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert list(tmp_path.glob("*/samples/*.mp4")), "the example's job wrote no samples"


PLAN_ROWS = [  # rows of the table: (model, ranks) and what the README says gives them: launcher flags, overrides.
    # Two of them here (the command as written, and 5B); every row, the cluster ones too, is rerun against the table
    # by `python bench/plan_rows.py --check` (5B on 64 ranks alone takes 83 s of CI).
    ("CogVideoX-2B", "8", ([], [])),
    ("CogVideoX-5B", "8", ([], ["model.preset=cogvideox-5b"])),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, ranks, extra", PLAN_ROWS, ids=[f"{m.split(',')[0]}x{r.split()[0]}" for m, r, _ in PLAN_ROWS]
)
def test_plan_example_gives_the_readme_table(model, ranks, extra):
    """The planner's README example as written (the first row), and with what the README says gives the other rows:
    the recommendation, its predicted peak and the counts of layouts that fit are the table's."""
    assert len(PLAN_EXAMPLES) == 1, PLAN_EXAMPLES
    argv = shlex.split(PLAN_EXAMPLES[0])[1:]
    flags, overrides = extra
    argv = argv[:1] + flags + argv[1:] + overrides
    r = subprocess.run(
        [sys.executable, "-m", "launch", *argv], env=ENV, capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    section = README.split("## Which layout fits", 1)[1].split("\n## ", 1)[0]
    row = next(ln for ln in section.splitlines() if ln.startswith(f"| {model} | {ranks} |"))
    knobs, peak = re.search(r"`([^`]+)` \(dp=(\d+)\) \| ([\d.]+) GiB", row).group(1, 3)
    fit, total, no_ac = map(int, re.search(r"\| (\d+) of (\d+) \((\d+)\) \|$", row).groups())
    rec = next(ln for ln in r.stdout.splitlines() if ln.startswith("recommendation: "))
    assert sorted(knobs.split()) == sorted(rec.split(" (dp=")[0].removeprefix("recommendation: ").split()), rec
    assert f"it fits ({peak} of" in rec, rec
    layouts = [ln.split("|")[1:-1] for ln in r.stdout.splitlines() if re.match(r"^\| \d+ \|", ln)]
    fits = [cells for cells in layouts if cells[15].strip() == "yes"]
    assert (len(fits), len(layouts), sum(c[5].strip() == "none" for c in fits)) == (fit, total, no_ac)


def test_launcher_lines_name_their_tests():
    """Each launcher line of the Launching section names the test file that runs it, and that file exists."""
    section = README.split("## Launching", 1)[1].split("\n## ", 1)[0]
    for bullet in re.findall(r"^- \*\*.*?(?=^- \*\*|\Z)", section, re.S | re.M):
        named = re.findall(r"`(tests/test_\w+\.py)`", bullet)
        assert named, f"README launcher line names no test: {bullet[:120]}"
        for path in named:
            assert (ROOT / path).is_file(), path
