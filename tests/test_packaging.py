"""What a user and CI meet: no torch at run time, the README's test command, the pins."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


# Entry points define absl flags, which are process-wide: each is imported in a process of its own.
ENTRY_POINTS = tuple(sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "nvl_jax").glob("*.py")
    if "flags.DEFINE" in p.read_text()))


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
    assert {"nvl_jax.train", "nvl_jax.evaluate", "nvl_jax.chat"} <= set(ENTRY_POINTS)
    for group in (library, *({entry} for entry in ENTRY_POINTS)):
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



def test_a_non_editable_install_finds_its_default_config_away_from_the_source_tree(tmp_path):
    """``pip install .`` then ``python -m nvl_jax.train`` from another folder: the demo config is installed."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(ROOT)], check=True, capture_output=True, text=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    # -I keeps the source tree and the editable install off sys.path; the installed copy is all there is.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import runpy; "
            "sys.argv = ['train', '--print_config', '--config.model.depth=3']; "
            "runpy.run_module('nvl_jax.train', run_name='__main__')")
    result = subprocess.run([sys.executable, "-I", "-c", code, str(site)], cwd=elsewhere, env=env,
                            capture_output=True, text=True)
    assert "depth: 3" in result.stdout, result.stdout + result.stderr
    assert "in_silico_nsd" in result.stdout
