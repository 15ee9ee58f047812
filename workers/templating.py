"""Rendering rule params: a sandboxed Jinja environment where alert data is only ever data.

Templates come from the operator's config; labels and annotations are attacker-influenced
values that are passed in as variables and never compiled themselves. ``StrictUndefined`` turns
a missing label into an error instead of an empty string quietly changing the action.

Rendering is bounded in size and time (``RenderLimits``), in the process, without a fork:

- Output: each template's output is streamed and refused past 64 KiB.
- Amplifiers: ``*`` (repetition), ``**`` and ``%`` are checked before they run; every filter
  and method call gets numeric arguments of at most 10,000 (``indent(30000)``, ``ljust(10**9)``
  are refused) and its result is refused past the output limit; format strings with a width or
  precision of five digits or more are refused; ``range`` is limited to 10,000 items.
- Time: each template has a budget (1 s). In the worker's task process (the main thread), a
  timer signal interrupts a runaway loop; elsewhere every sandbox call checks the deadline.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from jinja2 import StrictUndefined, Template, TemplateError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from remediations import ResponderError
from workers import secrets
from workers.alerts import Alert

MAX_RENDERED_CHARS = 64 * 1024


@dataclass(frozen=True)
class RenderLimits:
    """The bounds every render runs under."""

    max_chars: int = MAX_RENDERED_CHARS
    max_number_arg: int = 10_000
    max_range: int = 10_000
    budget_s: float = 1.0


LIMITS = RenderLimits()
# A width or precision of five digits or more in a %-format or a str.format spec.
_HUGE_PERCENT_WIDTH = re.compile(r"%[-#0 +*]*(\d{5,}|\d*\.\d{5,})")
_HUGE_BRACE_WIDTH = re.compile(r"\{[^{}]*:[^{}]*\d{5,}[^{}]*\}")


class RenderError(ResponderError, ValueError):
    """A template failed to compile or render; the message says which param and why."""


class RenderLimitError(RenderError):
    """A render went past its size or time bound."""


def urlquote(value: object) -> str:
    """Percent-encode a value for one URL part: '/', '?', '#', '@', ':' are all encoded."""
    return quote(str(value), safe="")


def path_segment(value: object) -> str:
    """A value as one path component: refused if it could walk out of a directory.

    Refuses ``/``, ``\\``, NUL, an empty value, ``.`` and ``..``, and a leading ``-`` (an
    option to the program). Use it for every argument rendered from alert data that names a
    file or directory: ``argv: [/usr/bin/rotate, "/var/log/app/{{ labels.job | path_segment }}"]``.
    """
    text = str(value)
    if text in ("", ".", "..") or any(c in text for c in "/\\\x00") or text.startswith("-"):
        raise RenderError(f"not a safe path segment: {text[:100]!r}")
    return text


_deadline = threading.local()


def _check_deadline() -> None:
    until = getattr(_deadline, "until", None)
    if until is not None and time.monotonic() > until:
        raise RenderLimitError(f"render took longer than {LIMITS.budget_s}s")


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple)) and len(value) > LIMITS.max_chars:
        raise RenderLimitError(f"intermediate value of {len(value)} items (limit {LIMITS.max_chars})")
    return value


def _check_args(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, (int, float)) and not isinstance(arg, bool) and abs(arg) > LIMITS.max_number_arg:
            raise RenderLimitError(f"numeric argument {arg} over {LIMITS.max_number_arg}")


def _check_format(template: str) -> None:
    if _HUGE_PERCENT_WIDTH.search(template) or _HUGE_BRACE_WIDTH.search(template):
        raise RenderLimitError("format width or precision too large")


def _check_format_filter(value: Any, _args: tuple[Any, ...], _kwargs: Mapping[str, Any]) -> None:
    if isinstance(value, str):
        _check_format(value)


def _check_replace(value: Any, args: tuple[Any, ...], _kwargs: Mapping[str, Any]) -> None:
    # replace(s, old, new): the result can be len(s) times longer than s when old is ''.
    if isinstance(value, str) and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        old, new = args[0], args[1]
        hits = len(value) + 1 if old == "" else value.count(old)
        if len(value) + hits * (len(new) - len(old)) > LIMITS.max_chars:
            raise RenderLimitError("replace result too large")


def _check_indent(value: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    width = args[0] if args else kwargs.get("width", 4)
    lines = value.count("\n") + 1 if isinstance(value, str) else 0
    if isinstance(width, int) and lines * width > LIMITS.max_chars:
        raise RenderLimitError("indent result too large")


# Filters whose result can be far larger than their input and arguments suggest.
_AMPLIFIERS: dict[str, Callable[[Any, tuple[Any, ...], Mapping[str, Any]], None]] = {
    "format": _check_format_filter,
    "replace": _check_replace,
    "indent": _check_indent,
}


def _bounded_filter(fn: Callable[..., Any], amplifier: Callable[..., None] | None) -> Callable[..., Any]:
    """``fn`` with the render bounds: deadline, argument sizes, its amplification, result size."""
    # @pass_context / @pass_eval_context / @pass_environment filters get that object first.
    leading = 1 if getattr(fn, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check_deadline()
        value, rest = args[leading] if len(args) > leading else None, args[leading + 1 :]
        _check_args(rest, kwargs)  # the filtered value itself is data, not an argument
        if amplifier is not None:
            amplifier(value, rest, kwargs)
        return _check_size(fn(*args, **kwargs))

    return wrapper


def _bounded_range(*args: int) -> range:
    _check_args(args, {})
    result = range(*args)
    if len(result) > LIMITS.max_range:
        raise RenderLimitError(f"range of {len(result)} items (limit {LIMITS.max_range})")
    return result


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox with the size and time bounds of ``RenderLimits``."""

    intercepted_binops = frozenset(["*", "**", "%", "+"])

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """Refuse repetition, powers and formatting that would blow up, before running them."""
        _check_deadline()
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if (
                    isinstance(seq, (str, list, tuple))
                    and isinstance(count, int)
                    and len(seq) * max(count, 0) > LIMITS.max_chars
                ):
                    raise RenderLimitError("repetition result too large")
        elif operator == "**":
            numbers = isinstance(left, (int, float)) and isinstance(right, (int, float))
            if numbers and (
                abs(right) > LIMITS.max_number_arg or (abs(left) > 1 and right * math.log2(abs(left)) > 4096)
            ):
                raise RenderLimitError("power result too large")
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        """Check numeric arguments and the result of every method or function call."""
        _check_deadline()
        _check_args(args, kwargs)
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """Refuse ``str.format`` on a format string with a huge width or precision."""
        owner = getattr(value, "__self__", None)
        if isinstance(owner, str):
            _check_format(owner)
        return super().wrap_str_format(value)


_ENV = BoundedSandbox(undefined=StrictUndefined, autoescape=False)
_ENV.filters["urlquote"] = urlquote
_ENV.filters["path_segment"] = path_segment
for _name, _fn in list(_ENV.filters.items()):
    _ENV.filters[_name] = _bounded_filter(_fn, _AMPLIFIERS.get(_name))
_ENV.globals["range"] = _bounded_range
# secret('NAME') renders a reference, resolved only as the remediation runs (workers.secrets).
_ENV.globals["secret"] = secrets.reference


def _on_alarm(_signum: int, _frame: Any) -> None:
    raise RenderLimitError(f"render took longer than {LIMITS.budget_s}s")


@contextlib.contextmanager
def _budget() -> Iterator[None]:
    """The render's time budget: a deadline for sandbox calls, and a timer on the main thread."""
    _deadline.until = time.monotonic() + LIMITS.budget_s
    on_main = threading.current_thread() is threading.main_thread()
    previous: Any = None
    if on_main:
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, LIMITS.budget_s)
    try:
        yield
    finally:
        if on_main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        _deadline.until = None


def _render_bounded(template: Template, context: Mapping[str, Any]) -> str:
    parts: list[str] = []
    size = 0
    with _budget():
        for part in template.generate(context):
            size += len(part)
            if size > LIMITS.max_chars:
                raise RenderLimitError(f"rendered value is over {LIMITS.max_chars} characters")
            parts.append(part)
    return "".join(parts)


@lru_cache(maxsize=1024)
def compile_template(source: str) -> Template:
    """Compile a template string once (raises jinja2's TemplateSyntaxError)."""
    return _ENV.from_string(source)


def template_context(alert: Alert | None) -> dict[str, Any]:
    """The variables templates see: ``labels``, ``annotations`` and ``alert``; every string
    without the characters of a secret reference (alert data must never forge one)."""
    if alert is None:
        return {"labels": {}, "annotations": {}, "alert": {}}
    data = _scrubbed(alert.template_data())
    return {"labels": data["labels"], "annotations": data["annotations"], "alert": data}


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        return secrets.scrub(value)
    if isinstance(value, dict):
        return {
            secrets.scrub(key) if isinstance(key, str) else key: _scrubbed(item)
            for key, item in value.items()
        }
    return value


def render_string(source: str, context: Mapping[str, Any]) -> str:
    """Render one template string; plain strings without ``{{``/``{%`` are returned as they are."""
    if "{{" not in source and "{%" not in source and "{#" not in source:
        return source
    try:
        return _render_bounded(compile_template(source), context)
    except TemplateError as exc:
        raise RenderError(f"{type(exc).__name__}: {exc.message or exc}") from exc


def render_value(value: Any, context: Mapping[str, Any], path: str = "params") -> Any:
    """Render every string inside a params structure (dicts and lists walked, keys left alone);
    a ``{secret: NAME}`` value becomes the secret's reference (``workers.secrets``)."""
    try:
        reference = secrets.whole_param(value)
    except secrets.SecretError as exc:
        raise RenderError(f"{path}: {exc}") from exc
    if reference is not None:
        return reference
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
    try:
        if secrets.whole_param(value) is not None:
            return
    except secrets.SecretError as exc:
        raise RenderError(f"{path}: {exc}") from exc
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
