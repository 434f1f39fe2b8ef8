"""The README's promises: the Quick start's two commands, CI running the second
verbatim, and every Python example running as written."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    section = README.split("## Quick start", 1)[1]
    block = re.search(r"```[^\n]*\n(.*?)```", section, re.S).group(1)
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert len(lines) == 2
    install, test = lines
    assert "pip install ." in install and install.endswith("pipeline demo")
    assert '".[test]"' in test and "pytest" in test
    assert test in (ROOT / ".ci" / "run").read_text()


def test_python_examples_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    for code in blocks:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=tmp_path, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "accuracy" in r.stdout


def test_cli_synopsis_matches_the_parser():
    from pipeline.cli import build_parser

    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)
    documented = set(re.findall(r"^pipeline (\w[\w-]*)", README, re.M))
    assert documented <= commands, documented - commands
    assert {"generate", "ingest", "info", "plan", "distances", "knn", "gmm", "demo"} <= documented
