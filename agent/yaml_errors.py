"""One line for a YAML syntax error: ``file:line:column: invalid YAML: problem (context)``.

Shared by the configuration, Application documents and CLI contexts, so an operator sees
the same shape of message wherever a file is malformed.
"""

from __future__ import annotations

from typing import Any


def yaml_error(source: str, exc: Any) -> str:
    """``exc`` is a ``yaml.YAMLError``; marks are 0-based, the message 1-based."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["unreadable"])[0]
    context = getattr(exc, "context", None)
    detail = f"{problem} ({context})" if context else problem
    return f"{where}: invalid YAML: {' '.join(str(detail).split())}"
