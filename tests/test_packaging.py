"""What a user and CI meet: no torch at run time, the README's test command, the pins."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


ENTRY_POINTS = ("nvl_jax.train", "nvl_jax.evaluate")  # each defines absl flags: one per process


def _imports_torch(modules) -> subprocess.CompletedProcess:
    code = (
        "import importlib, sys\n"
        f"for m in {sorted(modules)!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers'))\n"
        "print(bad)\nsys.exit(1 if bad else 0)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def test_runtime_code_never_imports_torch():
    """Importing every runtime module must not pull torch (it is a test-only dependency)."""
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "nvl_jax").rglob("*.py")
        if "bench" not in p.parts and p.name != "__main__.py"}
    library = modules - set(ENTRY_POINTS)
    for group in (library | {ENTRY_POINTS[0]}, {ENTRY_POINTS[1]}):
        result = _imports_torch(group)
        assert result.returncode == 0, result.stdout + result.stderr


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = ci.strip().splitlines()[-1]
    assert "pytest" in command
    assert command in (ROOT / "README.md").read_text()


def test_torch_is_pinned_exactly_in_the_test_extra_only():
    setup = (ROOT / "setup.py").read_text()
    runtime = re.findall(r'"([^"]+)"', setup[setup.index("install_requires"):setup.index("extras_require")])
    assert runtime and not [r for r in runtime if r.startswith(("torch", "diffusers"))]
    assert re.search(r'"torch==2\.13\.0"', setup)

