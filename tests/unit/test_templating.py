"""Rendering params: sandboxed, strict, and alert data is never itself a template."""

from __future__ import annotations

import pytest

from workers.alerts import Alert
from workers.templating import RenderError, render_string, render_value, template_context, urlquote


def alert(**labels: str) -> Alert:
    return Alert.model_validate(
        {
            "status": "firing",
            "labels": {"alertname": "X", **labels},
            "annotations": {"summary": "s"},
            "startsAt": "2026-11-23T05:02:19.803814981Z",
            "fingerprint": "abc123",
        }
    )


def test_renders_labels_annotations_and_alert() -> None:
    """Templates see ``labels``, ``annotations`` and ``alert`` (Alertmanager field names)."""
    ctx = template_context(alert(instance="h1"))
    assert (
        render_string("{{ labels.instance }}/{{ annotations.summary }}/{{ alert.fingerprint }}", ctx)
        == "h1/s/abc123"
    )
    assert render_string("{{ alert.startsAt }}", ctx) == "2026-11-23T05:02:19.803814981Z"


@pytest.mark.parametrize(
    "hostile",
    [
        "{{ 7*7 }}",
        "{{ ''.__class__.__mro__ }}",
        "{% for x in range(10) %}x{% endfor %}",
        "$(id)",
        "`id`",
        "a;b",
    ],
)
def test_label_values_are_data_not_templates(hostile: str) -> None:
    """A label that looks like a template comes out exactly as it went in."""
    assert render_string("{{ labels.instance }}", template_context(alert(instance=hostile))) == hostile


def test_sandbox_blocks_attribute_escapes_in_templates() -> None:
    """Even a template from the config cannot reach Python internals."""
    with pytest.raises(RenderError):
        render_string("{{ ''.__class__.__mro__[1].__subclasses__() }}", template_context(alert()))


def test_missing_label_is_an_error_not_empty() -> None:
    """StrictUndefined: a typo in a label name fails instead of rendering ''."""
    with pytest.raises(RenderError, match="instanc"):
        render_string("{{ labels.instanc }}", template_context(alert(instance="h1")))


def test_render_value_walks_structures_and_names_the_path() -> None:
    """Strings inside dicts and lists are rendered; an error names where it happened."""
    ctx = template_context(alert(instance="h1"))
    assert render_value({"a": ["{{ labels.instance }}", 3], "b": {"c": True}}, ctx) == {
        "a": ["h1", 3],
        "b": {"c": True},
    }
    with pytest.raises(RenderError, match=r"params\.b\[1\]"):
        render_value({"b": ["ok", "{{ labels.nope }}"]}, ctx)


def test_plain_strings_are_not_compiled() -> None:
    """A string without template syntax is returned as it is."""
    assert render_string("100% {not a template}", {}) == "100% {not a template}"


def test_urlquote_encodes_every_url_delimiter() -> None:
    """The urlquote filter encodes '/', '?', '#', '@' and ':' so a value stays in its URL part."""
    assert urlquote("127.0.0.1:1@evil/../x?y#z") == "127.0.0.1%3A1%40evil%2F..%2Fx%3Fy%23z"
    assert (
        render_string("{{ labels.instance | urlquote }}", template_context(alert(instance="a b"))) == "a%20b"
    )


def test_huge_output_is_refused() -> None:
    """A template may not blow a 10,000-character label up without bound."""
    ctx = template_context(alert(instance="x" * 10_000))
    assert len(render_string("{{ labels.instance }}", ctx)) == 10_000
    with pytest.raises(RenderError, match=r"too large|limit"):
        render_string("{{ labels.instance * 10 }}", ctx)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ 'a' * 10**9 }}", "repetition"),
        ("{{ 'x'.ljust(10**9) }}", "numeric argument"),
        ("{{ '{:>999999999}'.format(1) }}", "format width"),
        ("{{ '%0999999d' % 1 }}", "format width"),
        ("{{ 2 ** 100000 }}", "power"),
        ("{{ labels.instance | replace('', 'xxxxxxxx') }}", "replace"),
        ("{% for i in range(100000) %}{% endfor %}", "over 10000"),
        ("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}", "longer than"),
    ],
)
def test_rendering_is_bounded_in_size_and_time(template: str, message: str) -> None:
    """Amplifiers are refused before they allocate, and a runaway loop stops at the budget."""
    import time

    ctx = template_context(alert(instance="x" * 10_000))
    started = time.monotonic()
    with pytest.raises(RenderError, match=message):
        render_string(template, ctx)
    assert time.monotonic() - started < 3


def test_path_segment_refuses_what_walks_out_of_a_directory() -> None:
    """path_segment keeps a label to one path component."""
    ctx = template_context(alert(job="api"))
    assert render_string("/var/log/{{ labels.job | path_segment }}", ctx) == "/var/log/api"
    for hostile in ("../../etc", "..", ".", "a/b", "", "-rf", "a\\b"):
        with pytest.raises(RenderError, match="safe path segment"):
            render_string("{{ labels.job | path_segment }}", template_context(alert(job=hostile)))


def test_numbers_being_filtered_are_data_not_arguments() -> None:
    """Only a filter's arguments are bounded: a large value piped through a filter renders."""
    ctx = template_context(alert(port="50000"))
    assert render_string("{{ 50000 | string }}-{{ labels.port | int | abs }}", ctx) == "50000-50000"
    assert render_string("{{ 'a-b' | replace('-', ':') }}", ctx) == "a:b"
    with pytest.raises(RenderError, match="over 10000"):
        render_string("{{ 'x' | center(50000) }}", ctx)
