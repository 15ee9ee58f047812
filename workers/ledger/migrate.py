"""Applying Alembic migrations from code (``responder db upgrade``, ``responder dev``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from workers.ledger.db import normalize_url

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at the packaged migrations and ``url``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation: a literal '%' in a password must be doubled.
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the ledger at ``url`` up to ``revision``."""
    command.upgrade(alembic_config(url), revision)
