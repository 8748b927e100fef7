"""A variant of one of swattn's kernel modules, built at run time from exact textual edits.

The experiment tools (time_d256.py, time_pipelined.py) time a changed kernel against the shipped
one without a second copy of the kernel on disk: each (old, new) edit must match the module's
source exactly once, or the tool stops and names the edit that no longer applies.
"""

import importlib.util
import inspect
import os
import sys
import tempfile


def edited_module(module, edits, name: str):
    """``module`` (e.g. swattn.kernels.backward) with ``edits`` applied, imported as ``name`` in its package."""
    src = inspect.getsource(module)
    for old, new in edits:
        n = src.count(old)
        if n != 1:
            raise SystemExit(f"an edit matches {n} times (needs exactly 1) in {module.__file__}:\n{old}")
        src = src.replace(old, new)
    # TileLang reads the prim_func's source back (inspect), so the module must live in a real file.
    path = os.path.join(tempfile.mkdtemp(prefix="swattn_variant_"), name.rpartition(".")[2] + ".py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = module.__package__
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def swapper(module, attr: str, variant):
    """``use(on)``: point ``module.attr`` at ``variant`` (on) or back at what it was (off), so that
    the package's own launchers call the variant without a second copy of them."""
    original = getattr(module, attr)

    def use(on: bool) -> None:
        setattr(module, attr, variant if on else original)

    return use
