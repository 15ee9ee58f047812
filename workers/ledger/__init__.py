"""The ledger: SQLAlchemy models, engines, the repository and Alembic migrations."""
