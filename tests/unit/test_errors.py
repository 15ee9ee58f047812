"""The exception tree: every error raised on purpose is a ResponderError, drawn in one place."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import receiver
import remediations
import workers
from remediations.errors import ResponderError


def _our_exceptions() -> list[type[BaseException]]:
    found: list[type[BaseException]] = []
    for package in (remediations, workers, receiver):
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            if ".migrations" in info.name:  # alembic's scripts run when imported
                continue
            module = importlib.import_module(info.name)
            found += [
                value
                for value in vars(module).values()
                if inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
            ]
    return found


def test_every_error_defined_here_is_in_the_tree() -> None:
    """One root: ``except ResponderError`` catches every error raised on purpose, and the tree
    in ``remediations/errors.py`` names each one."""
    errors = _our_exceptions()
    names = {error.__name__ for error in errors}
    assert {"PublishError", "ApiError", "RenderError", "MatcherError", "EventsFailed"} <= names
    outside = sorted(error.__qualname__ for error in errors if not issubclass(error, ResponderError))
    assert outside == []
    tree = inspect.getdoc(importlib.import_module("remediations.errors")) or ""
    assert sorted(name for name in names if name not in tree) == []


def test_render_and_matcher_errors_are_still_value_errors() -> None:
    from workers.matching import MatcherError
    from workers.templating import RenderError

    assert issubclass(RenderError, ValueError) and issubclass(MatcherError, ValueError)
