"""The op schemas and the normalize modes, read from their one source: ``csrc/op_schemas.h``
(``patchblend/_csrc/op_schemas.h`` in an installed package), which the compiled library defines its ops and parses
their ``normalize`` argument from.

:func:`op_schemas` returns the schemas (``["blend(Tensor patches, ...) -> Tensor", ...]``) for
:mod:`patchblend._backend`, which defines them itself when no compiled library is loaded; :func:`normalize_modes`
returns the modes (``("count", "weight", "none")``, the order of the kernels' ``Normalize`` enum) for
:data:`patchblend._validate.NORMALIZE_MODES`. A named array of the header (``kOpSchemas``, ``kNormalizeModes``) is
parsed as C++ reads it (:func:`parse_string_array`): string literals, adjacent ones joined, entries separated by
commas, comments skipped.

Like :mod:`patchblend._build`, this module imports no torch.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional, Tuple

from . import _build

HEADER = "op_schemas.h"
SCHEMAS_ARRAY = "kOpSchemas"
NORMALIZE_ARRAY = "kNormalizeModes"
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t"}


def _literal(text: str, start: int) -> "tuple[str, int]":
    """The string literal opening at ``text[start] == '"'``: its value and the index after its closing quote."""
    value, i = [], start + 1
    while i < len(text):
        char = text[i]
        if char == '"':
            return "".join(value), i + 1
        if char == "\\":
            escaped = text[i + 1:i + 2]
            if escaped not in _ESCAPES:
                raise ValueError(f"unsupported escape \\{escaped} in a string literal")
            value.append(_ESCAPES[escaped])
            i += 2
            continue
        if char == "\n":
            break
        value.append(char)
        i += 1
    raise ValueError(f"unterminated string literal at offset {start}")


def parse_schemas(header_text: str) -> List[str]:
    """The entries of the ``kOpSchemas`` array in ``header_text`` (the text of ``op_schemas.h``), in order."""
    return parse_string_array(header_text, SCHEMAS_ARRAY)


def parse_string_array(header_text: str, name: str) -> List[str]:
    """The entries of the string array ``name`` (``const char* name[] = {...}``) in ``header_text``, in order."""
    found = re.search(rf"\b{re.escape(name)}\s*\[\s*\]\s*=\s*\{{", header_text)
    if found is None:
        raise ValueError(f"no `{name}[] = {{` array")
    text, i = header_text, found.end()
    entries: List[str] = []
    current: Optional[List[str]] = None  # the literals of the entry being read
    while i < len(text):
        char = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = len(text) if i < 0 else i
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise ValueError("unterminated /* comment")
            i = end + 2
        elif char == '"':
            value, i = _literal(text, i)
            current = (current or []) + [value]
        elif char in ",}":
            if current is not None:
                entries.append("".join(current))
            elif char == ",":
                raise ValueError(f"an empty entry in {name} (offset {i})")
            current = None
            if char == "}":
                return entries
            i += 1
        elif char.isspace():
            i += 1
        else:
            raise ValueError(f"unexpected {char!r} in {name} (offset {i}): only string literals, commas and "
                             "comments may appear there")
    raise ValueError(f"{name} has no closing brace")


def header_path(csrc: Optional[Path] = None) -> Optional[Path]:
    """``op_schemas.h`` of the sources :func:`patchblend._build.source_dir` finds, or None without sources."""
    csrc = csrc or _build.source_dir()
    return None if csrc is None else csrc / HEADER


def read_array(name: str, what: str, csrc: Optional[Path] = None) -> List[str]:
    """The entries of the array ``name`` of ``op_schemas.h`` (``what`` it holds, for the errors). Raises
    RuntimeError when the installation lacks the header, or the array cannot be parsed or is empty."""
    path = header_path(csrc)
    if path is None or not path.is_file():
        raise RuntimeError(f"the {what} ({HEADER}) are not in this installation; reinstall patchblend from its "
                           "sdist or wheel")
    try:
        entries = parse_string_array(path.read_text(), name)
    except ValueError as exc:
        raise RuntimeError(f"{path} could not be read: {exc}") from exc
    if not entries:
        raise RuntimeError(f"{path} lists no {what} ({name} is empty)")
    return entries


def op_schemas(csrc: Optional[Path] = None) -> List[str]:
    """The schemas of every ``patchblend::`` op, read from ``op_schemas.h`` (see :func:`read_array`)."""
    return read_array(SCHEMAS_ARRAY, "op schemas", csrc)


def normalize_modes(csrc: Optional[Path] = None) -> Tuple[str, ...]:
    """The blend's ``normalize`` modes, in the order of the kernels' ``Normalize`` enum, read from
    ``op_schemas.h`` (see :func:`read_array`)."""
    return tuple(read_array(NORMALIZE_ARRAY, "normalize modes", csrc))
