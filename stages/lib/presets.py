"""Presets: a real run's parameters kept as a file (``stages/presets/*.yaml``), applied through ``dvc exp run -S``.

A preset is a partial params.yaml: only the keys it changes, in the same groups. Applying it never rewrites
params.yaml by hand; DVC sets each key for the experiment (and records it), so ``dvc exp show`` and
``dvc metrics diff`` compare the run with the default::

    python -m stages.lib.presets stages/presets/qwen3-4b-math500.yaml            # dvc exp run -S model.name=... ...
    python -m stages.lib.presets stages/presets/qwen3-4b-math500.yaml --print    # only print that command
    python -m stages.lib.presets stages/presets/qwen3-4b-math500.yaml -- --queue  # extra arguments go to dvc exp run

The preset is checked first: params.yaml with the preset's values must pass the params model (``parse_params``),
so a misspelt key or a bad value stops with one line naming the preset file and the key, before DVC starts.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml

from stages.lib.errors import UserError
from stages.lib.params import PARAMS_FILE, Params, parse_params


class PresetError(UserError):
    """A preset file that cannot be read or does not fit the params model."""


def read_preset(path: str | Path) -> dict[str, Any]:
    """The preset's keys as nested groups, like params.yaml; PresetError naming the file when it is not a mapping."""
    path = Path(path)
    try:
        preset = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PresetError(f"{path}: preset not found") from None
    except yaml.YAMLError as error:
        raise PresetError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(preset, dict) or not preset:
        raise PresetError(f"{path}: expected a mapping of params.yaml groups to the values the preset changes")
    return preset


def leaves(preset: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every leaf of a nested preset (lists are values, not groups)."""
    flat: dict[str, Any] = {}
    for key, value in preset.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(leaves(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def apply_preset(base: Mapping[str, Any], preset: Mapping[str, Any], source: str) -> Params:
    """``base`` (params.yaml as loaded) with every leaf of ``preset`` set, through the params model. A key the
    preset names that params.yaml does not have is refused by name (DVC's ``-S`` would add it silently)."""
    merged = json.loads(json.dumps(base))  # a deep copy of plain YAML values
    for dotted, value in leaves(preset).items():
        *groups, key = dotted.split(".")
        node = merged
        for group in groups:
            if not isinstance(node.get(group), dict):
                raise PresetError(f"{source}: `{dotted}`: params.yaml has no group `{group}` there")
            node = node[group]
        if key not in node:
            raise PresetError(f"{source}: `{dotted}`: not a key of params.yaml")
        node[key] = value
    return parse_params(merged, source)


def override_value(value: Any) -> str:
    """``value`` in the Hydra override grammar that ``dvc exp run -S`` parses: strings single-quoted (a backslash
    is literal there unless it precedes a quote, so ``\\boxed{}`` and newlines pass as written), numbers, bools,
    null and lists as themselves."""
    if isinstance(value, str):
        escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'")
        return f"'{escaped}'"
    if isinstance(value, list):
        return "[" + ",".join(override_value(item) for item in value) + "]"
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    raise PresetError(f"preset value {value!r}: expected a string, number, bool, null or list")


def set_flags(preset: Mapping[str, Any]) -> list[str]:
    """``dvc exp run`` arguments setting each leaf of ``preset``: ``-S key=value`` (``override_value``)."""
    flags: list[str] = []
    for dotted, value in leaves(preset).items():
        flags += ["-S", f"{dotted}={override_value(value)}"]
    return flags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.lib.presets", description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", type=Path, help="a stages/presets/*.yaml file")
    parser.add_argument("--print", action="store_true", help="print the dvc exp run command instead of running it")
    parser.add_argument("dvc_args", nargs="*", help="after --: more arguments for dvc exp run (e.g. --queue)")
    args = parser.parse_args(argv)
    try:
        preset = read_preset(args.preset)
        base = yaml.safe_load(PARAMS_FILE.read_text())
        apply_preset(base, preset, str(args.preset))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = ["dvc", "exp", "run", *set_flags(preset), *args.dvc_args]
    if args.print:
        print(shlex.join(command))
        return 0
    return subprocess.call(command)


if __name__ == "__main__":
    raise SystemExit(main())
