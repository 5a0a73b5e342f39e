"""The install: one namespace `lpo` (nothing generic at the top of site-packages), `python -m lpo`, every package
folder listed for wheels, and the import rules of the layout (curation knows no trainer, no module imports the CLI)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]


def _outside(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    """Run Python from a directory outside the checkout, so only what is installed can be imported."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


def test_only_the_lpo_namespace_is_importable(tmp_path: Path) -> None:
    result = _outside(tmp_path, "import importlib.util as u, lpo.reward.lrm, lpo.cli;"
                                "assert u.find_spec('lpo.reward.lrm.model') is not None;"
                                "print([n for n in ('cli', 'curate', 'reward') if u.find_spec(n) is not None])")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_python_dash_m_lpo_runs_the_cli(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "lpo", "--help"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "Usage: python -m lpo" in " ".join(result.stdout.split())
    assert "optimize" in result.stdout


def test_every_package_folder_is_listed_for_wheels() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"lpo"} | {"lpo." + ".".join(p.parent.relative_to(REPO).parts)
                       for top in ("core", "curate", "reward") for p in (REPO / top).rglob("__init__.py")}
    assert listed == found


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_imports_run_one_way() -> None:
    """lpo.cli -> lpo.reward -> lpo.curate -> lpo.core: the ground floor imports none of the others, curation
    imports no reward code, and no library module the CLI."""
    for path in (REPO / "core").rglob("*.py"):
        assert not any(name.startswith(("lpo.curate", "lpo.reward", "lpo.cli")) for name in _imports(path)), path
    for path in (REPO / "curate").rglob("*.py"):
        assert not any(name.startswith("lpo.reward") for name in _imports(path)), path
    for path in [*(REPO / "curate").rglob("*.py"), *(REPO / "reward").rglob("*.py")]:
        assert "lpo.cli" not in _imports(path), path


def _module_graph() -> dict[str, set[str]]:
    """lpo module -> the lpo modules it imports (anywhere in the file: lazy imports tie modules as much)."""
    files = {}
    for path in [REPO / "cli.py", *(REPO / "core").rglob("*.py"), *(REPO / "curate").rglob("*.py"),
                 *(REPO / "reward").rglob("*.py")]:
        parts = path.relative_to(REPO).with_suffix("").parts
        files["lpo." + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for module, path in files.items():
        names = _imports(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[module] = {name for name in names if name in files and name != module}
    return graph


def test_there_are_no_import_circles() -> None:
    graph = _module_graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError(f"import circle: {' -> '.join(path[path.index(module):] + [module])}")
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_no_module_is_over_500_lines() -> None:
    long = [(str(p.relative_to(REPO)), n) for p in [REPO / "cli.py", *(REPO / "core").rglob("*.py"),
                                                   *(REPO / "curate").rglob("*.py"),
                                                   *(REPO / "reward").rglob("*.py")]
            if (n := len(p.read_text().splitlines())) > 500]
    assert not long, long


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    command = next(line for line in (REPO / ".ci" / "run").read_text().splitlines() if "pytest" in line)
    assert f"\n{command}\n" in readme
    assert "ruff check ." in command and '-m "not gpu"' in command  # lint first; slow tests included


HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "open_clip")


def test_the_command_line_loads_no_model_library(tmp_path: Path) -> None:
    """`import lpo.cli` and `lpo --help` stay fast: torch, diffusers, transformers and the rest load only when a
    command runs (the command line's edge is the one place for lazy imports)."""
    code = (f"import sys, runpy\nsys.argv = ['lpo', '--help']\nimport lpo.cli\nloaded = [m for m in {HEAVY} if m in "
            "sys.modules]\ntry:\n    lpo.cli.main()\nexcept SystemExit:\n    pass\n"
            f"print(loaded, [m for m in {HEAVY} if m in sys.modules])")
    result = _outside(tmp_path, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[] []"


def _nested_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of each import below a module's top level, except under a top-level `if`/`try` (an optional
    extra)."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    guarded = {id(inner) for node in tree.body if isinstance(node, (ast.If, ast.Try)) for inner in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top | guarded:
            found.append((node.lineno, node.module if isinstance(node, ast.ImportFrom) else node.names[0].name))
    return found


def test_library_modules_import_our_modules_at_their_top() -> None:
    """Inside the library every module imports our modules at its top, so its import list is its honest map; only the
    command line imports a command's module when the command runs."""
    lazy = [(str(path.relative_to(REPO)), line, module)
            for path in [*(REPO / "core").rglob("*.py"), *(REPO / "curate").rglob("*.py"),
                         *(REPO / "reward").rglob("*.py")]
            for line, module in _nested_imports(path) if module and module.startswith("lpo")]
    assert not lazy, lazy
    edge = [module for _, module in _nested_imports(REPO / "cli.py") if module.startswith("lpo")]
    assert len(edge) <= 6, edge


# Third-party imports below a module's top, each with its reason: the ground floor and the family registry are read by
# the command line, which must not load torch or diffusers for `--help`; pyplot switches the process's matplotlib
# backend when imported; the rest are optional extras (GenEval's spaCy parser, VQAScore's t2v_metrics, ImageReward's
# timm), imported only by the scorer that needs them.
LAZY_THIRD_PARTY = {
    ("core/device.py", "torch"), ("core/plots.py", "matplotlib"), ("core/plots.py", "matplotlib.pyplot"),
    ("reward/backbones/family.py", "torch"), ("reward/backbones/family.py", "diffusers"),
    ("reward/backbones/family.py", "diffusers.utils"), ("curate/scorers/bvqa.py", "spacy"),
    ("curate/scorers/vqa.py", "t2v_metrics"), ("curate/scorers/imagereward.py", "timm.models.vision_transformer"),
    ("reward/toy/random_models.py", "timm.models.vision_transformer"),
}


def test_library_modules_import_third_party_libraries_at_their_top() -> None:
    """Laziness only where the reason above holds: a new function-level import of torch, transformers, PIL, ... in a
    library module fails here (move it to the module's top)."""
    lazy = {(str(path.relative_to(REPO)), module)
            for path in [*(REPO / "core").rglob("*.py"), *(REPO / "curate").rglob("*.py"),
                         *(REPO / "reward").rglob("*.py")]
            for _, module in _nested_imports(path) if module and not module.startswith("lpo")}
    assert lazy - LAZY_THIRD_PARTY == set(), sorted(lazy - LAZY_THIRD_PARTY)
    assert LAZY_THIRD_PARTY - lazy == set(), "an allowed lazy import is gone: drop it from LAZY_THIRD_PARTY"


@pytest.mark.slow  # builds and installs a wheel, then runs the demo on a tiny budget
def test_a_built_wheel_runs_the_demo_and_finds_the_suites_by_name(tmp_path: Path) -> None:
    """The toy models, suites and sample ship inside the wheel: installed outside the checkout (its dependencies
    from this environment), `lpo demo` with its default --models and `lpo eval suite`'s shipped names work."""
    wheels, target, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "source"
    # the tracked files only, copied: a build in the checkout would leave build/ there, and a stale build/ could
    # put removed modules into the wheel
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode == 0:
        for name in filter(None, tracked.stdout.split("\0")):
            if (REPO / name).is_file():
                (source / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, source / name)
    else:  # not a git checkout: everything but environments, outputs and caches
        shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", ".site",
                                                                    "*.egg-info", "__pycache__", ".*_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("lpo-*.whl")
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    where = tmp_path / "elsewhere"
    where.mkdir()
    found = subprocess.run([sys.executable, "-c", "import lpo; from lpo.reward.eval.suite import read_suite; "
                            "print(lpo.__file__, len(read_suite('lpo-sd15')['rows']))"],
                           cwd=where, env=env, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.startswith(str(target)) and found.stdout.split()[-1] == "4"
    demo = subprocess.run([sys.executable, "-m", "lpo", "demo", "--out", "run", "--train-prompts", "60",
                           "--val-prompts", "20", "--lrm-steps", "5", "--lpo-epochs", "1", "--images-per-prompt", "2",
                           "--held-out-prompts", "6", "--steps", "4"],
                          cwd=where, env=env, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert (where / "run" / "demo.md").is_file() and not (where / "manifests").exists()
