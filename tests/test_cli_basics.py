"""The CLI entry points exist and report user errors as one line with exit code 2."""

import subprocess
import sys

from llmlab import __version__
from llmlab.cli import main


def test_version_flag(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert __version__ in capsys.readouterr().out


def test_python_m_llmlab_runs():
    out = subprocess.run([sys.executable, "-m", "llmlab", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"llmlab {__version__}"
