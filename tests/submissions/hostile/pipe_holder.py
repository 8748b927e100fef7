"""Starts a child that keeps the step's stdout and stderr open for a minute, then carries on normally.

The original grader read each step's output through pipes until they closed:
the child held them, so every step waited for it ("import timed out" under a
short limit, a 45 s grading stretched to minutes), and the child outlived the grader.
"""

import subprocess
import sys

_SLEEPER = "import ctypes, time; ctypes.CDLL(None).prctl(15, b'swattn-hostile', 0, 0, 0); time.sleep(60)"
subprocess.Popen([sys.executable, "-c", _SLEEPER])  # inherits stdout and stderr
