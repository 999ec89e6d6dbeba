"""`python -m seekforge` is the `seekforge` command line (run as a subprocess, as a user runs it)."""

import os
import subprocess
import sys
from pathlib import Path

from seekforge.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def test_python_m_seekforge_is_the_command_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # one help width here and in the child
    done = run("seekforge", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout == build_parser().format_help()
    bad = run("seekforge", "no-such-command")
    assert bad.returncode == 2 and "invalid choice: 'no-such-command'" in bad.stderr
