"""Alertmanager's matcher syntax and a pure ``matches(labels, matchers)``.

Parsing follows Alertmanager's classic parser (``pkg/labels/parse.go``): a label name, one of
``=``, ``!=``, ``=~``, ``!~``, and a value that may be double-quoted, with ``\\"``, ``\\\\`` and
``\\n`` escapes; a spurious backslash is literal. Regexes are fully anchored, and a missing label
matches as the empty string, as in Prometheus.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

Op = Literal["=", "!=", "=~", "!~"]

# '=~' before '=' so that '~' is not read as part of the value.
_MATCHER = re.compile(r"^\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(=~|=|!=|!~)\s*(.*?)\s*$", re.DOTALL)


class MatcherError(ValueError):
    """A matcher string that Alertmanager would refuse too."""


@dataclass(frozen=True)
class Matcher:
    """One label matcher: ``name op value``."""

    name: str
    op: Op
    value: str
    _regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def create(cls, name: str, op: Op, value: str) -> Matcher:
        """Build a matcher, compiling its anchored regex for ``=~`` and ``!~``."""
        regex = None
        if op in ("=~", "!~"):
            try:
                regex = re.compile(f"^(?:{value})$", re.DOTALL)
            except re.error as exc:
                raise MatcherError(f"invalid regex {value!r}: {exc}") from exc
        return cls(name=name, op=op, value=value, _regex=regex)

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether the label set satisfies this matcher (a missing label is '')."""
        actual = labels.get(self.name, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        assert self._regex is not None  # noqa: S101 - set by create() for regex ops
        found = self._regex.match(actual) is not None
        return found if self.op == "=~" else not found

    def __str__(self) -> str:
        escaped = self.value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'{self.name}{self.op}"{escaped}"'


def parse_matcher(text: str) -> Matcher:
    """Parse one matcher such as ``severity=~"page|critical"``.

    Raises:
        MatcherError: the text is not a valid matcher.
    """
    found = _MATCHER.match(text)
    if found is None:
        raise MatcherError(f"bad matcher format: {text}")
    name, op, raw = found.group(1), found.group(2), found.group(3)
    if raw == "":
        raise MatcherError(f"matcher value is not present: {text}")
    expect_trailing_quote = raw.startswith('"')
    if expect_trailing_quote:
        raw = raw[1:]
    value: list[str] = []
    escaped = False
    for index, char in enumerate(raw):
        last = index == len(raw) - 1
        if escaped:
            escaped = False
            if char == "n":
                value.append("\n")
            elif char in ('"', "\\"):
                value.append(char)
            else:  # a spurious escape: the backslash is literal
                value.append("\\" + char)
        elif char == "\\":
            if last:
                value.append("\\")
            else:
                escaped = True
        elif char == '"':
            if not expect_trailing_quote or not last:
                raise MatcherError(f"matcher value contains unescaped double quote: {found.group(3)}")
            expect_trailing_quote = False
        else:
            value.append(char)
    if expect_trailing_quote:
        raise MatcherError(f"matcher value contains unescaped double quote: {found.group(3)}")
    return Matcher.create(name, op, "".join(value))  # type: ignore[arg-type]


def parse_matchers(text: str) -> list[Matcher]:
    """Parse a comma-separated list such as ``{foo="bar", baz!~"q.*"}`` (braces optional)."""
    text = text.removeprefix("{").removesuffix("}")
    tokens: list[str] = []
    current: list[str] = []
    inside_quotes = escaped = False
    for char in text:
        if char == "," and not inside_quotes:
            tokens.append("".join(current))
            current = []
            continue
        if char == '"':
            if escaped:
                escaped = False
            else:
                inside_quotes = not inside_quotes
        elif char == "\\":
            escaped = not escaped
        else:
            escaped = False
        current.append(char)
    if "".join(current).strip():
        tokens.append("".join(current).strip())
    return [parse_matcher(token) for token in tokens]


def matches(labels: Mapping[str, str], matchers: Iterable[Matcher]) -> bool:
    """Whether every matcher holds for the label set (an empty list matches everything)."""
    return all(matcher.matches(labels) for matcher in matchers)
