"""Alertmanager matcher syntax: Alertmanager's own parse cases, anchoring and semantics."""

from __future__ import annotations

import pytest

from workers.matching import Matcher, MatcherError, matches, parse_matcher, parse_matchers


def m(name: str, op: str, value: str) -> Matcher:
    return Matcher.create(name, op, value)  # type: ignore[arg-type]


# Cases from Alertmanager's pkg/labels/parse_test.go.
PARSE_CASES = [
    ('{foo="bar"}', [m("foo", "=", "bar")]),
    ('{foo=~"bar.*"}', [m("foo", "=~", "bar.*")]),
    ('{foo!="bar"}', [m("foo", "!=", "bar")]),
    ('{foo!~"bar.*"}', [m("foo", "!~", "bar.*")]),
    ('{foo="bar", baz!="quux"}', [m("foo", "=", "bar"), m("baz", "!=", "quux")]),
    (
        '{foo="bar",baz!~".*quux", derp="wat"}',
        [m("foo", "=", "bar"), m("baz", "!~", ".*quux"), m("derp", "=", "wat")],
    ),
    ('{foo=""}', [m("foo", "=", "")]),
    ('{foo="bar,quux", job="job1"}', [m("foo", "=", "bar,quux"), m("job", "=", "job1")]),
    ('{foo = "bar", dings != "bums", }', [m("foo", "=", "bar"), m("dings", "!=", "bums")]),
    ("foo=bar,dings!=bums", [m("foo", "=", "bar"), m("dings", "!=", "bums")]),
    (
        '{quote="She said: \\"Hi, ladies! That\'s gender-neutral…\\""}',
        [m("quote", "=", 'She said: "Hi, ladies! That\'s gender-neutral…"')],
    ),
    ('statuscode=~"5.."', [m("statuscode", "=~", "5..")]),
    ("tricky=~~~", [m("tricky", "=~", "~~")]),
    ('trickier==\\\\=\\=\\"', [m("trickier", "=", '=\\=\\="')]),
    (
        'contains_quote != "\\"" , contains_comma !~ "foo,bar" , ',
        [m("contains_quote", "!=", '"'), m("contains_comma", "!~", "foo,bar")],
    ),
]

PARSE_ERRORS = [
    ("job=", "matcher value is not present"),
    ('job="value', "unescaped double quote"),
    ('job=value"', "unescaped double quote"),
    ('trickier==\\\\=\\=\\""', "unescaped double quote"),
    ('contains_unescaped_quote = foo"bar', "unescaped double quote"),
    ('{invalid-name = "valid label"}', "bad matcher format"),
    ('{foo=~"invalid[regexp"}', "invalid regex"),
    ('"{foo=\\"bar"}', "bad matcher format"),
    ('"foo=\\"bar"', "bad matcher format"),
    ('"foo="bar""', "bad matcher format"),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parses_alertmanager_cases(text: str, expected: list[Matcher]) -> None:
    """Every valid case of Alertmanager's parser test parses to the same matchers."""
    assert parse_matchers(text) == expected


@pytest.mark.parametrize(("text", "message"), PARSE_ERRORS)
def test_refuses_what_alertmanager_refuses(text: str, message: str) -> None:
    """Every invalid case of Alertmanager's parser test is refused with its reason."""
    with pytest.raises(MatcherError, match=message):
        parse_matchers(text)


def test_escaped_newline_and_spurious_backslash() -> None:
    """``\\n`` is a newline; a backslash before another character stays literal."""
    assert parse_matcher('x="a\\nb"').value == "a\nb"
    assert parse_matcher('x="a\\db"').value == "a\\db"


@pytest.mark.parametrize(
    ("matcher", "labels", "expected"),
    [
        ('severity=~"page|critical"', {"severity": "critical"}, True),
        ('severity=~"page|critical"', {"severity": "critical-ish"}, False),  # anchored end
        ('severity=~"crit.*"', {"severity": "notcritical"}, False),  # anchored start
        ('severity=~"crit.*"', {"severity": "critical"}, True),
        ('severity!~"crit.*"', {"severity": "warning"}, True),
        ('severity!="page"', {}, True),  # missing label is ""
        ('team=""', {}, True),
        ('team=""', {"team": "db"}, False),
        ('team!~".+"', {}, True),
        ('alertname="X"', {"alertname": "X"}, True),
        ('alertname="X"', {"alertname": "x"}, False),
        ('msg=~"a.b"', {"msg": "a\nb"}, True),  # '.' matches newline, as in Go's (?s)
    ],
)
def test_matcher_semantics(matcher: str, labels: dict[str, str], expected: bool) -> None:
    """Regexes are fully anchored and a missing label compares as the empty string."""
    assert parse_matcher(matcher).matches(labels) is expected


def test_all_matchers_must_hold() -> None:
    """A rule matches only when every matcher holds."""
    rules = parse_matchers('alertname="A", severity=~"page|critical"')
    assert matches({"alertname": "A", "severity": "page"}, rules)
    assert not matches({"alertname": "A", "severity": "info"}, rules)


def test_str_round_trips() -> None:
    """A matcher prints in Alertmanager syntax that parses back to itself."""
    original = parse_matcher('q="say \\"hi\\"\\nnow\\\\"')
    assert parse_matcher(str(original)) == original


def test_catastrophic_regex_matches_in_linear_time() -> None:
    """(a+)+b against a long label: RE2 answers at once where a backtracking engine would stall."""
    import time

    matcher = parse_matcher('instance=~"(a+)+b"')
    started = time.monotonic()
    assert not matcher.matches({"instance": "a" * 100_000 + "c"})
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("regex", ["(?=a)a", "(a)\\\\1", "(?<!x)y", "a++"])
def test_syntax_re2_refuses_is_refused(regex: str) -> None:
    """Look-around, backreferences and possessive quantifiers are refused, as Alertmanager does."""
    with pytest.raises(MatcherError, match="invalid regex"):
        parse_matcher(f'x=~"{regex}"')


def test_dot_matches_newline_like_alertmanager() -> None:
    """Alertmanager anchors as ^(?s:...)$: '.' matches a newline."""
    assert parse_matcher('x=~"a.b"').matches({"x": "a\nb"})
