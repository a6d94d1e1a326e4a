"""Reading a study file: a path or a packaged study's name, YAML that refuses a key given
twice, `--set FIELD=VALUE` overrides applied before validation (spec.parse_study)."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

from . import PACKAGED_STUDIES, packaged_study_names
from .spec import StudyError, StudySpec, parse_study


def resolve_study_path(file: str | os.PathLike) -> Path:
    """The file as given, else a packaged study of that name (`quickstart`, `quickstart.yaml`)."""
    p = Path(file).expanduser()
    if p.exists():
        return p
    name = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    packaged = PACKAGED_STUDIES / name
    if len(p.parts) <= 2 and packaged.exists():  # a bare name, or studies/<name>
        return packaged
    known = ", ".join(packaged_study_names())
    raise StudyError(f"study file {str(file)!r} not found in {Path.cwd()} nor among the packaged studies "
                     f"({known}). Give a path to a YAML file or one of those names.")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last one
    silently, so `lr: 1e-3` further down would quietly win over the `lr` the reader sees first."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    first: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        try:
            if key in first:
                raise StudyError(f"field {key!r}: given twice in the same section (lines {first[key]} and {line}); "
                                 f"YAML would keep only the last: allowed once")
            first[key] = line
        except TypeError:  # an unhashable key: PyYAML itself reports it below
            pass
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(text: str):
    """A study file's YAML (duplicate keys are errors)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_study_file(file: str | os.PathLike, overrides: list[str] = ()) -> StudySpec:
    """Read and validate a study file; `overrides` ("evaluation.n_samples=10000", values in YAML
    syntax) replace fields first, so they are validated (and snapshotted) like the file's own."""
    path = resolve_study_path(file)
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise StudyError(f"{path}: not valid YAML: {e}") from None
    except StudyError as e:
        raise StudyError(f"{path}: {e}") from None
    if overrides and isinstance(raw, dict):
        raw = apply_overrides(raw, overrides)
    return parse_study(raw, str(path) + (f" with --set {' '.join(overrides)}" if overrides else ""))


DOTTED_CONTAINERS = ("sweep.grid", "sweep.random")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise StudyError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set training.epochs=5")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise StudyError(f"--set {item!r}: the value is not valid YAML: {e}") from None
        key = key.strip()
        # sweep.grid / sweep.random map dotted field names to lists: in
        # `sweep.grid.model.base_width=[8]` the container is sweep.grid, the key model.base_width.
        container = next((c for c in DOTTED_CONTAINERS if key.startswith(c + ".")), None)
        if container is not None:
            parents, leaf = container.split("."), key[len(container) + 1:]
        else:
            *parents, leaf = key.split(".")
        cur = raw
        for part in parents:
            if cur.get(part) is None:
                cur[part] = {}
            if not isinstance(cur[part], dict):
                raise StudyError(f"--set {item!r}: {part!r} is not a section")
            cur = cur[part]
        cur[leaf] = parsed
    return raw
