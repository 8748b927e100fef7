"""`make handout`: write the student starter tree from the solution.

Each region of solution.py between a line ``# >>> SOLUTION <part>`` and a line
``# <<< SOLUTION`` becomes, at the same indentation:

    # TODO(student): <part>
    <the region's leading comment lines: the hint>
    raise NotImplementedError("not implemented: <part> (see the TODO in solution.py)")

so the handout imports, its CPU tests run, and every test that needs a missing
part fails with that message instead of crashing. The tests, the reference,
the benchmark, the configs and the Makefile are copied unchanged.

    python course/handout.py [DEST]        # default: build/handout
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ["reference.py", "test.py", "bench.py", "Makefile", "pyproject.toml", "configs", ".ci"]
BEGIN = re.compile(r"^(?P<indent>\s*)# >>> SOLUTION (?P<part>.+?)\s*$")
END = re.compile(r"^\s*# <<< SOLUTION\s*$")

STUDENT_README = """# Sliding-window attention in TileLang: starter

Query i attends key j iff |i - j| <= window. Fill in the three TODOs of
`solution.py` (block range, masking, online softmax); each raises
`NotImplementedError` until you do.

    make test    # CPU tests run anywhere; GPU tests need a CUDA card
    make run     # compile (and, on a GPU, verify and time) your kernel
    make bench   # the benchmark table (GPU)

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
            out.append(f"{region['indent']}raise NotImplementedError({msg!r})\n")
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
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
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
