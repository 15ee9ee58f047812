"""Rendering rule params: a sandboxed Jinja environment where alert data is only ever data.

Templates come from the operator's config; labels and annotations are attacker-influenced
values that are passed in as variables and never compiled themselves. ``StrictUndefined`` turns
a missing label into an error instead of an empty string quietly changing the action.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from jinja2 import StrictUndefined, Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from workers.alerts import Alert

MAX_RENDERED_CHARS = 64 * 1024


class RenderError(ValueError):
    """A template failed to compile or render; the message says which param and why."""


def urlquote(value: object) -> str:
    """Percent-encode a value for one URL part: '/', '?', '#', '@', ':' are all encoded."""
    return quote(str(value), safe="")


_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
_ENV.filters["urlquote"] = urlquote


@lru_cache(maxsize=1024)
def compile_template(source: str) -> Template:
    """Compile a template string once (raises jinja2's TemplateSyntaxError)."""
    return _ENV.from_string(source)


def template_context(alert: Alert | None) -> dict[str, Any]:
    """The variables templates see: ``labels``, ``annotations`` and ``alert``."""
    if alert is None:
        return {"labels": {}, "annotations": {}, "alert": {}}
    data = alert.template_data()
    return {"labels": data["labels"], "annotations": data["annotations"], "alert": data}


def render_string(source: str, context: Mapping[str, Any]) -> str:
    """Render one template string; plain strings without ``{{``/``{%`` are returned as they are."""
    if "{{" not in source and "{%" not in source and "{#" not in source:
        return source
    try:
        rendered = compile_template(source).render(context)
    except TemplateError as exc:
        raise RenderError(f"{type(exc).__name__}: {exc.message or exc}") from exc
    if len(rendered) > MAX_RENDERED_CHARS:
        raise RenderError(f"rendered value is {len(rendered)} characters (limit {MAX_RENDERED_CHARS})")
    return rendered


def render_value(value: Any, context: Mapping[str, Any], path: str = "params") -> Any:
    """Render every string inside a params structure (dicts and lists walked, keys left alone)."""
    if isinstance(value, str):
        try:
            return render_string(value, context)
        except RenderError as exc:
            raise RenderError(f"{path}: {exc}") from exc
    if isinstance(value, Mapping):
        return {key: render_value(item, context, f"{path}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [render_value(item, context, f"{path}[{index}]") for index, item in enumerate(value)]
    return value


def renderer(context: Mapping[str, Any]) -> Callable[[str], str]:
    """A ``render(template) -> str`` bound to one alert's data, for the remediation context."""
    return lambda source: render_string(source, context)


def check_syntax(value: Any, path: str = "params") -> None:
    """Compile every template in a params structure, raising RenderError naming the bad one."""
    if isinstance(value, str):
        try:
            compile_template(value)
        except TemplateError as exc:
            raise RenderError(f"{path}: {type(exc).__name__}: {exc.message or exc}") from exc
    elif isinstance(value, Mapping):
        for key, item in value.items():
            check_syntax(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_syntax(item, f"{path}[{index}]")
