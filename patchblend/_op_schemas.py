"""The op schemas, read from their one source: ``csrc/op_schemas.h`` (``patchblend/_csrc/op_schemas.h`` in an
installed package), which the compiled library defines its ops from.

:func:`op_schemas` returns them (``["blend(Tensor patches, ...) -> Tensor", ...]``) for
:mod:`patchblend._backend`, which defines them itself when no compiled library is loaded. The header's
``kOpSchemas`` array is parsed as C++ reads it: string literals, adjacent ones joined, entries separated by
commas, comments skipped.

Like :mod:`patchblend._build`, this module imports no torch.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

from . import _build

HEADER = "op_schemas.h"
_ARRAY = re.compile(r"kOpSchemas\s*\[\s*\]\s*=\s*\{")
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
                raise ValueError(f"unsupported escape \\{escaped} in a schema string")
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
    found = _ARRAY.search(header_text)
    if found is None:
        raise ValueError("no `kOpSchemas[] = {` array")
    text, i = header_text, found.end()
    schemas: List[str] = []
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
                schemas.append("".join(current))
            elif char == ",":
                raise ValueError(f"an empty entry in kOpSchemas (offset {i})")
            current = None
            if char == "}":
                return schemas
            i += 1
        elif char.isspace():
            i += 1
        else:
            raise ValueError(f"unexpected {char!r} in kOpSchemas (offset {i}): only string literals, commas and "
                             "comments may appear there")
    raise ValueError("kOpSchemas has no closing brace")


def header_path(csrc: Optional[Path] = None) -> Optional[Path]:
    """``op_schemas.h`` of the sources :func:`patchblend._build.source_dir` finds, or None without sources."""
    csrc = csrc or _build.source_dir()
    return None if csrc is None else csrc / HEADER


def op_schemas(csrc: Optional[Path] = None) -> List[str]:
    """The schemas of every ``patchblend::`` op, read from ``op_schemas.h``. Raises RuntimeError when the
    installation lacks it or it cannot be parsed."""
    path = header_path(csrc)
    if path is None or not path.is_file():
        raise RuntimeError(f"the op schemas ({HEADER}) are not in this installation; reinstall patchblend from "
                           "its sdist or wheel")
    try:
        schemas = parse_schemas(path.read_text())
    except ValueError as exc:
        raise RuntimeError(f"{path} could not be read: {exc}") from exc
    if not schemas:
        raise RuntimeError(f"{path} lists no op schema")
    return schemas
