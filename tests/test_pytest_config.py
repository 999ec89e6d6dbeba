"""The project's pytest settings (pyproject.toml) as a failing test's report shows them."""

import subprocess
import sys
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_a_failures_captured_log_leaves_out_debug_records_of_loggers_that_propagate(tmp_path):
    """A logger set to DEBUG that propagates to the root (as torch's structured-trace logger "torch.__trace" may,
    one record per compile event) would bury a failure's error in its records; WARNING and up still show."""
    (tmp_path / "test_logs.py").write_text(
        "import logging\n"
        "def test_fails():\n"
        "    log = logging.getLogger('chatty')\n"
        "    log.setLevel(logging.DEBUG)\n"
        "    log.debug('a ' + 'debug record')\n"  # the record's text is not in the traceback's source lines
        "    log.warning('a ' + 'warning record')\n"
        "    assert False\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-c", str(PYPROJECT), "--rootdir", str(tmp_path),
                          "-p", "no:cacheprovider", str(tmp_path / "test_logs.py")],
                         capture_output=True, text=True, timeout=120)
    assert "1 failed" in run.stdout, run.stdout + run.stderr
    assert "a warning record" in run.stdout and "a debug record" not in run.stdout, run.stdout
