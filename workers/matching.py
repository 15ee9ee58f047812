"""Alertmanager's matcher syntax and a pure ``matches(labels, matchers)``.

Parsing follows Alertmanager's classic parser (``pkg/labels/parse.go``): a label name, one of
``=``, ``!=``, ``=~``, ``!~``, and a value that may be double-quoted, with ``\\"``, ``\\\\`` and
``\\n`` escapes; a spurious backslash is literal. Regexes are fully anchored, and a missing label
matches as the empty string, as in Prometheus.

Regexes are RE2, as in Alertmanager (Go's ``regexp``): linear time in the label's length, so a
label value from anyone who can reach Alertmanager cannot stall a worker with a backtracking
pattern, and syntax RE2 refuses (look-around, backreferences) is refused here too, when the
config is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import re2

from remediations import ResponderError

Op = Literal["=", "!=", "=~", "!~"]

# '=~' before '=' so that '~' is not read as part of the value.
_MATCHER = re.compile(r"^\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(=~|=|!=|!~)\s*(.*?)\s*$", re.DOTALL)


class MatcherError(ResponderError, ValueError):
    """A matcher string that Alertmanager would refuse too."""


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.dot_nl = True  # Alertmanager anchors as ^(?s:...)$: '.' matches a newline
_RE2_OPTIONS.log_errors = False  # refusals are reported as MatcherError, not on stderr


def compile_re2(value: str) -> Any:
    """Compile a fully anchored RE2 regex; MatcherError for syntax RE2 (and Go) refuses."""
    try:
        return re2.compile(f"^(?:{value})$", _RE2_OPTIONS)
    except re2.error as exc:
        message = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise MatcherError(f"invalid regex {value!r}: {message}") from exc


@dataclass(frozen=True)
class Matcher:
    """One label matcher: ``name op value``."""

    name: str
    op: Op
    value: str
    _regex: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def create(cls, name: str, op: Op, value: str) -> Matcher:
        """Build a matcher, compiling its anchored RE2 regex for ``=~`` and ``!~``."""
        regex = compile_re2(value) if op in ("=~", "!~") else None
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
