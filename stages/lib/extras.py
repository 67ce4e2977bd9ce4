"""Optional dependencies: import one, or stop in one line naming the pip extra that installs it.

Only non-default options need them (``pyproject.toml`` ``[project.optional-dependencies]``): ``cosine``
(sentence-transformers and its packaged all-MiniLM-L6-v2, for ``semantic_entropy.method: cosine``), ``nnsight``
(for ``trace.backend: nnsight``) and ``gpu`` (vLLM, checked in stages/lib/sampling/vllm.py). The ``dev`` extra
installs the first two, so the tests run every option.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from stages.lib.errors import UserError


class MissingExtraError(UserError):
    """A non-default option needs a package that is not installed."""


def require(module: str, extra: str, option: str) -> ModuleType:
    """Import ``module`` for ``option`` (a params setting), or raise MissingExtraError naming ``extra``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module.split(".")[0]:
            raise  # the package is there but itself misses something: not an extra the user forgot
        raise MissingExtraError(f"params.yaml: {option} needs the `{module}` package, which is not installed; "
                                f"install the `{extra}` extra: pip install -e \".[{extra}]\"") from None
