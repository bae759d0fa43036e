"""Registering the compute functions with Globus Compute and writing their ids into the registry file.

``inference-gateway register-functions --config FILE`` registers every function
of ``FUNCTIONS`` once, then sets ``globus.function_ids`` of the file's ``globus``
endpoints. The file is edited in place at the positions the YAML parser reports,
so its comments, order and quoting stay as the operator wrote them; the updated
endpoints are validated before the file is replaced.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.config import ConfigError, EndpointSettings, parse_config
from gateway.dispatch.compute import FUNCTIONS, load_function
from gateway.dispatch.globus import ComputeClient


def register_functions(client: ComputeClient, names: Iterable[str] = FUNCTIONS) -> dict[str, str]:
    """Register the named compute functions; their ids by name."""
    return {name: str(client.register_function(load_function(name))) for name in names}


def globus_endpoints(text: str, source: str, selected: Iterable[str] = ()) -> dict[int, str]:
    """The positions in ``endpoints`` of the ``globus`` endpoints to update, with their ``cluster/framework``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    entries = data.get("endpoints") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: no 'endpoints' list")
    found = {
        index: f"{entry.get('cluster')}/{entry.get('framework')}"
        for index, entry in enumerate(entries)
        if isinstance(entry, dict) and entry.get("transport") == "globus"
    }
    wanted = set(selected)
    unknown = wanted - set(found.values())
    if unknown:
        raise ConfigError(f"{source}: no globus endpoint named {', '.join(sorted(unknown))}")
    if wanted:
        found = {index: name for index, name in found.items() if name in wanted}
    if not found:
        raise ConfigError(
            f"{source}: no endpoint has transport: globus, so there is nothing to register: the compute functions "
            "are registered only for endpoints reached through Globus Compute"
        )
    for index, name in found.items():
        if not isinstance(entries[index].get("globus"), dict):
            raise ConfigError(f"{source}: endpoint {name} needs a 'globus' section with its endpoint_id")
    return found


def write_function_ids(text: str, positions: Iterable[int], ids: Mapping[str, str]) -> str:
    """``text`` with ``globus.function_ids`` of the endpoints at ``positions`` set to ``ids``; nothing else moves."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    endpoints = _child(root, "endpoints")
    assert isinstance(endpoints, yaml.SequenceNode)
    edits: list[tuple[int, int, str]] = []
    for position in positions:
        globus = _child(endpoints.value[position], "globus")
        assert isinstance(globus, yaml.MappingNode)
        edits.extend(_function_ids_edits(text, globus, ids))
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _child(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.value == key:
                found: yaml.Node = value_node
                return found
    return None


def _line_end(text: str, node: yaml.Node) -> int:
    """Where a new line may be inserted after ``node``."""
    while isinstance(node, yaml.CollectionNode) and not node.flow_style and node.value:
        last = node.value[-1]
        node = last[1] if isinstance(node, yaml.MappingNode) else last
    index = node.end_mark.index
    if index > 0 and text[index - 1] == "\n":
        return index
    newline = text.find("\n", index)
    return len(text) if newline < 0 else newline + 1


def _flow(value: Any) -> str:
    """``value`` in YAML flow style (JSON scalars are YAML scalars)."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key}: {_flow(item)}" for key, item in value.items()) + "}"
    return json.dumps(value)


def _function_ids_edits(text: str, globus: yaml.MappingNode, ids: Mapping[str, str]) -> list[tuple[int, int, str]]:
    current = _child(globus, "function_ids")
    if current is None:
        if globus.flow_style:
            merged = {**yaml.safe_load(text[globus.start_mark.index : globus.end_mark.index]), "function_ids": ids}
            return [(globus.start_mark.index, globus.end_mark.index, _flow(merged))]
        indent = " " * globus.value[0][0].start_mark.column
        at = _line_end(text, globus)
        lead = "" if at == 0 or text[at - 1] == "\n" else "\n"
        block = "".join(f"{indent}  {name}: {value}\n" for name, value in ids.items())
        return [(at, at, f"{lead}{indent}function_ids:\n{block}")]
    if isinstance(current, yaml.MappingNode) and not current.flow_style and current.value:
        edits = []
        indent = " " * current.value[0][0].start_mark.column
        at = _line_end(text, current)
        for name, value in ids.items():
            existing = _child(current, name)
            if existing is not None and existing.start_mark.index < existing.end_mark.index:
                edits.append((existing.start_mark.index, existing.end_mark.index, value))
            elif existing is not None:
                edits.append((existing.start_mark.index, existing.start_mark.index, f" {value}"))
            else:
                lead = "" if text[at - 1] == "\n" else "\n"
                edits.append((at, at, f"{lead}{indent}{name}: {value}\n"))
        return edits
    # A flow mapping or an empty value: write the ids inline, keeping any other keys already there.
    existing_value = yaml.safe_load(text[current.start_mark.index : current.end_mark.index])
    merged = {**(existing_value if isinstance(existing_value, dict) else {}), **ids}
    if current.start_mark.index == current.end_mark.index:
        return [(current.start_mark.index, current.start_mark.index, f" {_flow(merged)}")]
    return [(current.start_mark.index, current.end_mark.index, _flow(merged))]


def register_into_file(
    path: Path, client: ComputeClient, selected: Iterable[str] = (), report: Callable[[str], None] = print
) -> dict[str, str]:
    """Register the compute functions and write their ids into the ``globus`` endpoints of the registry ``path``.

    The ids are reported before the file is touched, so that they are not lost if
    the file cannot be written; the file is replaced only when the updated
    endpoints validate with their new ids.
    """
    source = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    targets = globus_endpoints(text, source, selected)
    ids = register_functions(client)
    for name, function_id in ids.items():
        report(f"registered {FUNCTIONS[name]} as {function_id}")
    updated = write_function_ids(text, targets, ids)
    _check_written(updated, source, targets, ids)
    _replace(path, updated)
    report(f"{source}: function_ids written for {', '.join(targets.values())}")
    try:
        parse_config(updated, source)
    except ConfigError as exc:
        report(f"note: the file does not validate yet, for other reasons:\n{exc}")
    report(
        "To let only these functions run on the endpoint, add to its config.yaml:\n"
        "allowed_functions:\n" + "".join(f"  - {function_id}\n" for function_id in ids.values())
    )
    return ids


def _check_written(text: str, source: str, targets: Mapping[int, str], ids: Mapping[str, str]) -> None:
    """Refuse an edit that did not put ``ids`` exactly where they belong, or broke an updated endpoint."""
    entries = yaml.safe_load(text)["endpoints"]
    for index, name in targets.items():
        written = entries[index]["globus"].get("function_ids") or {}
        if any(str(written.get(function)) != function_id for function, function_id in ids.items()):
            raise ConfigError(f"{source}: could not write function_ids for {name}; set them by hand: {dict(ids)}")
        try:
            EndpointSettings.model_validate(entries[index])
        except ValidationError as exc:
            raise ConfigError(f"{source}: endpoint {name} is not valid: {exc}") from None


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` in one step, keeping the file's permissions."""
    mode = path.stat().st_mode & 0o7777
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
