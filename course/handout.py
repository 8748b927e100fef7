"""`make handout`: write the student starter, a repository of its own, from the solution.

Each region of solution.py between a line ``# >>> SOLUTION <part>`` and a line
``# <<< SOLUTION`` becomes, at the same indentation:

    # TODO(student): <part>
    <the region's leading comment lines: the hint>
    raise NotImplementedError("not implemented: <part> (see the TODO in solution.py)")

so the handout imports, its CPU tests run, and every test that needs a missing
part fails with that message instead of crashing. The tests, the reference,
the benchmark and the card's configs are copied unchanged; so is the grader
(course/grade.py, its sandbox and harness, configs/grading.json), which needs
nothing the handout lacks: `make grade` there scores the student's own
solution.py exactly as the course does. The handout's own Makefile,
pyproject.toml, conftest.py and .ci/run come from course/handout_files/: its
`make test`, `lint`, `run`, `bench`, `grade` and `ci` work in it alone, its
lint does not offer to delete the starter's placeholder buffers, and its CI
passes on the unfilled starter by design (it states what it checks).

    python course/handout.py [DEST]        # default: build/handout
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = [
    "reference.py",
    "test.py",
    "bench.py",
    "configs/assignment.json",
    "configs/tiles.json",
    "configs/bench.json",
    "configs/gpus.json",
    "configs/grading.json",
    "course/grade.py",
    "course/sandbox.py",
    "course/README.md",
    "course/harness/channel.py",
    "course/harness/cases.py",
    "course/harness/probe.py",
    "course/harness/verify.py",
]
# handout_files/<name> -> where it goes in the handout
OWN = {"Makefile": "Makefile", "pyproject.toml": "pyproject.toml", "conftest.py": "conftest.py", "ci_run": ".ci/run"}
BEGIN = re.compile(r"^(?P<indent>\s*)# >>> SOLUTION (?P<part>.+?)\s*$")
END = re.compile(r"^\s*# <<< SOLUTION\s*$")

STUDENT_README = """# Sliding-window attention in TileLang: starter

Query i attends key j iff |i - j| <= window. Fill in the three TODOs of
`solution.py` (block range, masking, online softmax); each raises
`NotImplementedError` until you do.

    make test    # CPU tests run anywhere; GPU tests need a CUDA card; a TODO not done fails its tests
    make run     # compile (and, on a GPU, verify and time) your kernel
    make bench   # the benchmark table (GPU)
    make grade   # the course's grader on your solution.py (GPU items score only on a GPU): grade-report/
    make lint    # ruff
    make ci      # what .ci/run checks: lint, and the CPU tests with a TODO not done counted as expected to fail

On a CPU-only machine install a CPU build of torch before `make` (`pip install
torch==2.13.0` in the venv, as .ci/run does). `make grade` runs your code in a
sandbox and scores only what it can check itself (course/README.md says how).

Write your analysis in `analysis.md`.
"""


def strip_solution(source: str) -> tuple[str, list[str]]:
    """Replace every solution region by its TODO; return (handout source, parts)."""
    out, parts, region = [], [], None
    for n, line in enumerate(source.splitlines(keepends=True), 1):
        begin = BEGIN.match(line)
        if region is None and begin:
            region = {"indent": begin["indent"], "part": begin["part"], "hint": [], "code": False}
            out.append(f"{region['indent']}# TODO(student): {region['part']}\n")
            parts.append(region["part"])
        elif region is not None and END.match(line):
            msg = f"not implemented: {region['part']} (see the TODO in solution.py)"
            if '"' in msg or "\\" in msg:
                raise ValueError(f"line {n}: a part's name may not hold quotes or backslashes")
            out.append(f'{region["indent"]}raise NotImplementedError("{msg}")\n')  # as ruff format writes it
            region = None
        elif region is not None:
            if BEGIN.match(line):
                raise ValueError(f"line {n}: nested SOLUTION marker")
            if not region["code"] and line.strip().startswith("#"):
                out.append(line)  # the hint stays
            else:
                region["code"] = True  # the solution goes
        else:
            out.append(line)
    if region is not None:
        raise ValueError(f"unclosed SOLUTION region {region['part']!r}")
    return "".join(out), parts


def write_handout(dest: Path) -> list[str]:
    """Write the starter tree into ``dest`` (replaced if it exists); return the TODO parts."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in COPIED:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    for name, target in OWN.items():
        (dest / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / "course" / "handout_files" / name, dest / target)
    source, parts = strip_solution((ROOT / "solution.py").read_text())
    (dest / "solution.py").write_text(source)
    (dest / "README.md").write_text(STUDENT_README)
    (dest / "analysis.md").write_text("# Analysis\n\nApproach, complexity, measured tables, limits, trade-offs.\n")
    return parts


def main() -> None:
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "build" / "handout")
    parts = write_handout(dest)
    print(f"wrote the handout to {dest}: TODOs {', '.join(parts)}")


if __name__ == "__main__":
    main()
