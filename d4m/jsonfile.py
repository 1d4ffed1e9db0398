"""JSON from files that may be damaged or crafted (meta.json, classes.json, manifest.json, model_index.json, JSON
prototype files), parsed with a bound on size and nesting: Python's parser recurses once per level, so a file of
100000 '[' would end in a RecursionError instead of a refusal."""
from __future__ import annotations

import json
import os
import re
from typing import Any

MAX_DEPTH = 64  # the files read here nest 5 levels at most
MAX_BYTES = 64 << 20  # a settings file; ImageNet-21k's classes.json is about 4 MB
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def loads(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads, refusing with a ValueError a document nested deeper than `max_depth` (strings skipped: a bracket
    inside one does not count)."""
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        token = match[0]
        if token in "[{":
            depth += 1
            if depth > max_depth:
                raise ValueError(f"nested more than {max_depth} levels deep")
        elif token in "]}":
            depth -= 1
    return json.loads(text)


def read(path: str | os.PathLike, max_bytes: int | None = MAX_BYTES) -> Any:
    """The JSON document in the UTF-8 file `path`: ValueError when it is larger than `max_bytes` (None: any size),
    not UTF-8, not JSON or nested too deep; OSError when it cannot be read."""
    if max_bytes is not None and os.stat(path).st_size > max_bytes:
        raise ValueError(f"it is {os.stat(path).st_size} bytes, more than the {max_bytes} a settings file holds")
    with open(path, encoding="utf-8") as f:
        return loads(f.read())
