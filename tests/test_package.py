"""The package as a user gets it: the wheel installs and runs from anywhere, and the
layers import only downwards (no cycle, no import inside a function to dodge one)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "swattn"

# Each module's layer: a module may import only modules of a lower layer (kernels/
# beside window at the bottom; eager beside launch; api and modules over ops).
LAYERS = {
    "window": 0,
    "testing": 0,
    "kernels.common": 1,
    "kernels.forward": 2,
    "kernels.backward": 2,
    "kernels.decode": 2,
    "eager": 1,
    "launch": 3,
    "ops": 4,
    "decode": 6.5,
    "api": 5,
    "online": 6,
    "modules": 7,
    "distributed": 7,
    "integrations.transformers": 8,
    "__init__": 9,
}


def package_imports(path: Path) -> tuple[set[str], list[str]]:
    """(swattn modules imported at module level, those imported inside functions)."""
    name = path.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".")
    pkg = name.rsplit(".", 1)[0] if "." in name else ""
    top, nested = set(), []

    def resolve(node: ast.ImportFrom) -> list[str]:
        if node.level == 0:
            mod = node.module or ""
            if not mod.startswith("swattn"):
                return []
            base = mod.removeprefix("swattn").removeprefix(".")
        else:
            parts = pkg.split(".") if pkg else []
            parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
            base = ".".join([*parts, *([node.module] if node.module else [])])
        if node.module is None or base in ("", "kernels"):  # `from . import a, b`
            return [f"{base}.{a.name}".lstrip(".") for a in node.names]
        return [base]

    for node in ast.walk(ast.parse(path.read_text())):
        mods = []
        if isinstance(node, ast.ImportFrom):
            mods = resolve(node)
        elif isinstance(node, ast.Import):
            mods = [a.name.removeprefix("swattn.") for a in node.names if a.name.startswith("swattn.")]
        for m in mods:
            if node.col_offset == 0:
                top.add(m)
            else:
                nested.append(m)
    return top, nested


def test_layers_import_only_downwards():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".")
        if name.endswith("__init__") and name != "__init__":
            continue
        assert name in LAYERS, f"{name}: give the new module a layer in LAYERS"
        top, nested = package_imports(path)
        assert not nested, f"{name} imports {nested} inside a function"
        for m in top:
            assert LAYERS[m] < LAYERS[name], f"{name} (layer {LAYERS[name]}) imports {m} (layer {LAYERS[m]})"


def test_the_oracle_and_the_window_import_no_kernel():
    for name in ("testing", "window"):
        top, _ = package_imports(PACKAGE / f"{name}.py")
        assert not top, f"{name} imports {top}"
        assert "tilelang" not in (PACKAGE / f"{name}.py").read_text()


def test_wheel_installs_and_runs_outside_the_repository(tmp_path):
    """Build the wheel, install it into a fresh virtual environment (torch and
    tilelang come from this environment's site-packages, the editable install of
    the repository does not), and from a directory outside the repository: import
    swattn, load the shipped tiles and run the CPU path of the functions and the module."""
    # Build from the package's sources alone: a build in the repository would reuse its
    # build/lib, where a module deleted from swattn/ lives on and ships in the wheel.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "swattn", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, src],
        check=True,
    )
    wheel = next(tmp_path.glob("swattn-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    # torch, tilelang and the rest from here; a plain path line runs no .pth inside it,
    # so the editable install's finder stays out.
    deps = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    Path(site, "deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([py, "-m", "pip", "--version"], capture_output=True)  # pip comes from deps.pth
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], check=True)
    script = textwrap.dedent(
        """
        import torch, swattn
        from swattn import launch
        assert "site-packages" in swattn.__file__ and "REPO" not in swattn.__file__, swattn.__file__
        assert launch.tile_config(128, "sm_90a") and launch.tile_config(64, "sm_90a", "backward")
        q, k, v = torch.randn(1, 20, 4, 8), torch.randn(1, 20, 2, 8), torch.randn(1, 20, 2, 8)
        out = swattn.sliding_window_attention(q, k, v, 3)
        out2 = swattn.flash_attn_func(q, k, v, window_size=(3, 3))
        assert torch.allclose(out, out2, atol=1e-6)
        layer = swattn.SlidingWindowAttention(32, 4, 2, window=(5, 0))
        assert layer(torch.randn(2, 9, 32)).shape == (2, 9, 32)
        print("ok", swattn.__version__)
        """
    ).replace("REPO", str(ROOT))
    run = subprocess.run([py, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr
