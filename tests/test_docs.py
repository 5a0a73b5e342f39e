"""The documentation: the command-line reference is the code's (regenerated, it equals the committed page), the
README stays short, every page of the site's navigation exists, and the README's relative links resolve."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_reference", REPO / "docs" / "gen_cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_is_generated_from_the_code() -> None:
    committed = (REPO / "docs" / "cli.md").read_text()
    assert _generator().render() == committed, (
        "docs/cli.md differs from the command line: run python docs/gen_cli_reference.py and commit docs/cli.md")


def test_the_cli_reference_loads_no_torch() -> None:
    import subprocess

    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('g', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m.render(); "
            "print(sorted(n for n in sys.modules if n == 'torch' or n.startswith('torch.')))")
    result = subprocess.run([sys.executable, "-c", code, str(REPO / "docs" / "gen_cli_reference.py")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_readme_is_at_most_260_lines() -> None:
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= 260, f"README.md has {lines} lines; move detail to a page under docs/"


def _nav_pages(entries) -> list[str]:
    pages = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_of_the_navigation_exists() -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    docs = REPO / config.get("docs_dir", "docs")
    pages = _nav_pages(config["nav"])
    assert pages and "index.md" in pages
    missing = [page for page in pages if not (docs / page).is_file()]
    assert not missing, f"pages in mkdocs.yml's nav that do not exist under {docs}: {missing}"


def test_the_readmes_relative_links_resolve() -> None:
    text = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [target for target in targets if "://" not in target]
    assert local, "the README links to no page under docs/"
    missing = [target for target in local if not (REPO / target).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
