"""Config-file helpers shared by every YAML the project reads (merge configs, train recipes, pipelines).

Core layer: stdlib, ``yaml`` and ``pydantic`` only. Every error is one line that names the file, the
key path and the bad value:

* :func:`read_yaml_mapping` reads a YAML file whose top level must be a mapping;
* :func:`apply_set` applies one ``--set a.b.0.c=value`` override (:func:`parse_set_value` parses
  the value with YAML's safe loader);
* :func:`format_validation_error` turns a pydantic ``ValidationError`` into ``SOURCE: key.path: message``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError

__all__ = ["apply_set", "format_validation_error", "parse_set_value", "read_yaml_mapping"]


def parse_set_value(text: str, key: str = "") -> Any:
    """A ``--set`` value parsed with YAML's safe loader (tags such as ``!!python/...`` are refused).

    Raises:
        ValueError: one line naming the key and the value when it is not valid (safe) YAML.
    """
    import yaml

    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        reason = (getattr(exc, "problem", None) or str(exc).splitlines()[0]).strip()
        raise ValueError(
            f"--set {key}={text}: the value is not valid YAML ({reason}); quote it to pass a string, "
            f"e.g. {key}='{text}'"
        ) from None


def apply_set(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set a.b.0.c=value`` (value parsed as YAML) to the raw config dict, in place.

    A list item that is a plain string (an adapter path) becomes ``{"path": ...}`` when the key
    goes on to ``path``, ``weight`` or ``name``.

    Raises:
        ValueError: one line naming the assignment and what is wrong with it.
    """
    if "=" not in assignment:
        raise ValueError(f"--set {assignment!r}: expected KEY=VALUE, e.g. params.density=0.3")
    key, value = assignment.split("=", 1)
    parts = list(key.strip().split("."))
    if not key.strip() or any(not p for p in parts):
        raise ValueError(f"--set {assignment!r}: bad key {key!r}")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        path = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"--set {key}: {path!r} is not an index of a list of {len(node)}")
            idx = int(part)
            if last:
                node[idx] = parse_set_value(value, key.strip())
            else:
                if isinstance(node[idx], str) and parts[i + 1] in ("path", "weight", "name"):
                    node[idx] = {"path": node[idx]}
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = parse_set_value(value, key.strip())
            else:
                node = node.setdefault(part, {})
        else:
            raise ValueError(f"--set {key}: {'.'.join(parts[:i])!r} is a value, not a mapping or list")


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line: ``SOURCE: key.path: message`` for the first error.

    Unknown keys read ``unknown key``; a validator's ``Value error, `` prefix is dropped; a
    validator that checks the keys of a dict field (``"KEY: unknown key ..."``) names the key in
    the path.
    """
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
    msg = msg.removeprefix("Value error, ")
    sub = re.match(r"^([\w.-]+): (unknown key.*)$", msg)
    if sub:
        loc, msg = f"{loc}.{sub.group(1)}" if loc else sub.group(1), sub.group(2)
    return f"{source}: {loc or '(top level)'}: {msg}"


def read_yaml_mapping(path: str | Path, *, kind: str = "config", expected: str | None = None) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping (safe loader).

    Args:
        path: the file.
        kind: what the file is, for the missing-file message (``config file 'x.yaml' does not exist``).
        expected: the message when the top level is not a mapping (default: ``expected a mapping at
            the top level, got <type>``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not valid YAML, or not a mapping; one line naming the file.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: {expected or f'expected a mapping at the top level, got {type(raw).__name__}'}")
    return raw
