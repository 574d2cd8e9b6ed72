"""The repository has one code style: pyink's, configured in pyproject.toml."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_python_file_is_formatted_with_pyink():
  proc = subprocess.run(
      [sys.executable, '-m', 'pyink', '--check', '--quiet', '.'],
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  assert proc.returncode == 0, f'run `pyink .` to format:\n{proc.stderr}'
