"""README.md is what a newcomer runs: its set-up and test commands are exactly what CI runs, and its links and
the docs pages' links lead somewhere."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOC_PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
SETUP = 'pip install -c requirements-lock.txt -e ".[viewer,dev]"'
TEST = "pytest"


def section_commands(markdown: str, heading: str) -> list[str]:
    """The commands of the first fenced code block under the ``## <heading...>`` section (comments dropped)."""
    match = re.search(rf"^## {re.escape(heading)}[^\n]*\n(.*?)(?=^## |\Z)", markdown, flags=re.M | re.S)
    assert match, f"README.md has no section `## {heading}`"
    block = re.search(r"^```[a-z]*\n(.*?)^```", match.group(1), flags=re.M | re.S)
    assert block, f"README.md section `## {heading}` has no code block"
    lines = (line.split(" #", 1)[0].strip() for line in block.group(1).splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def ci_commands(script: str) -> list[list[str]]:
    """The commands of a bash script as argument lists, without comments, shell options and control lines."""
    commands = []
    for line in script.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        commands.append(shlex.split(line, comments=True))
    return commands


def test_readme_setup_and_test_commands_are_exactly_what_ci_runs():
    readme = README.read_text()
    setup, test = section_commands(readme, "Set-up"), section_commands(readme, "Test")
    assert setup == [SETUP] and test == [TEST]
    ci = ci_commands((REPO / ".ci" / "run").read_text())
    installs = [command for command in ci if command[:2] == ["pip", "install"]]
    assert installs == [shlex.split(SETUP)], f".ci/run installs with {installs}, README.md says {SETUP!r}"
    assert shlex.split(TEST) in ci, f".ci/run never runs README's test command {TEST!r}"
    assert ci.index(shlex.split(TEST)) > ci.index(shlex.split(SETUP)), ".ci/run tests before it installs"


def test_the_command_parsers_see_a_difference():
    readme = README.read_text().replace(SETUP, 'pip install -e ".[viewer]"')
    assert section_commands(readme, "Set-up") == ['pip install -e ".[viewer]"']
    assert ci_commands("set -e\n# x\npip install -e '.[dev]'  # why\npytest -q\n")[1:] == [
        ["pip", "install", "-e", ".[dev]"], ["pytest", "-q"]]


def test_readme_stays_short_and_names_the_method_papers():
    readme = README.read_text()
    assert len(readme.splitlines()) <= 160, "README.md is what a newcomer reads first: move details to docs/"
    assert "Farquhar et al." in readme and "Nature 2024" in readme and "Kossen et al." in readme
    assert "https://download.pytorch.org/whl/cpu" in readme  # how a CPU-only machine avoids the CUDA torch


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.*)$", markdown, flags=re.M)}


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_lead_to_a_file_and_heading(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.relative_to(REPO)}: link to missing {target}"
        if anchor:
            assert anchor in anchors(linked.read_text()), f"{page.relative_to(REPO)}: no heading for {target}"
