"""One settings object for every process, read from ``RESPONDER_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///responder.db"


class Settings(BaseSettings):
    """Runtime settings; the only place that reads the environment."""

    model_config = SettingsConfigDict(env_prefix="RESPONDER_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = DEFAULT_DATABASE_URL
    config: Path = Path("examples/responder.yaml")
    # "a,b" in the environment: NoDecode stops pydantic-settings from parsing lists as JSON.
    ingest_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    operator_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # 4 MiB: a large Alertmanager group must not be refused, since a 4xx is final for it.
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    log_format: str = Field(default="auto", pattern="^(auto|json|console)$")
    log_level: str = "INFO"
    # More key names whose values are secret (redacted in logs, the runs API, outputs), besides
    # password, secret, token, authorization, api_key, cookie, credential, private_key.
    redact_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Publishing from the receiver: bounded so the webhook answers well under Alertmanager's 10 s.
    publish_connect_timeout_s: float = Field(default=1.0, gt=0)
    publish_max_retries: int = Field(default=2, ge=0)
    # Wall-clock bound on publishing per webhook (a hung Redis accepts but never answers);
    # past it the answer is still 202 and the reconciler publishes the recorded alerts.
    publish_budget_s: float = Field(default=2.0, gt=0)

    # Delivery: the broker re-delivers an unacked message after this; must exceed twice the
    # longest hard time limit (checked at worker start).
    visibility_timeout_s: int = Field(default=3600, gt=0)
    # Whole attempts of a run: how many, and the backoff between them (full jitter, capped).
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_s: float = Field(default=5.0, ge=0)
    retry_backoff_cap_s: float = Field(default=300.0, ge=0)
    # A handle_alert runs the last run it queued itself, under the run's own limits, on a
    # worker that also consumes the remediations queue (workers.inline); false: every run is
    # sent to the remediations queue.
    inline_runs: bool = True
    # Seconds between the soft time limit (the remediation's timeout) and the hard kill.
    hard_limit_margin_s: float = Field(default=15.0, ge=2)
    # An attempt's lease on the ledger's clock, renewed by a heartbeat every lease/3 while the
    # remediation runs; once it expires, the attempt is abandoned and the run taken over.
    lease_s: float = Field(default=30.0, ge=1)
    # Statements wait this long for a lock (SQLite busy timeout, PostgreSQL lock_timeout);
    # a task that times out retries with backoff.
    db_lock_timeout_s: float = Field(default=30.0, gt=0)
    # Ledger statements slower than this are logged (slow_statement, with the duration).
    slow_statement_ms: float = Field(default=500.0, gt=0)
    # Ledger errors inside a task (lock timeout, connection lost): retries before the task
    # gives up and leaves the row to the reconciler.
    ledger_retries: int = Field(default=8, ge=0)

    # Reconciler (beat): publish what was recorded but never published after reconcile_after_s,
    # and publish again what was published but not handled (events) or not started (runs)
    # within redeliver_after_s (doubling per publish, up to 64x).
    reconcile_interval_s: float = Field(default=10.0, gt=0)
    reconcile_after_s: float = Field(default=30.0, ge=0)
    redeliver_after_s: float = Field(default=60.0, gt=0)
    # Dispatcher (beat): how often waiting runs whose grace period has passed are released, and
    # succeeded runs due for verification (repeat, verify_within) looked at.
    dispatch_interval_s: float = Field(default=1.0, gt=0)
    # Starts of handle_alert (or publishes of a never-claimed run) before giving up on it:
    # a poison message ends recorded with its error, never in a silent loop.
    max_deliveries: int = Field(default=5, ge=1)

    # Guard state in Redis (cooldowns, budgets, breakers, target locks: workers.guardstate);
    # separate prefixes keep deployments apart.
    guard_key_prefix: str = "responder:guard:"

    # Worker heartbeats (workers.heartbeat, read by /readyz): the sorted set, and how often
    # each worker writes to it (stale after three intervals).
    heartbeat_key: str = "responder:heartbeat:workers"
    heartbeat_interval_s: float = Field(default=5.0, gt=0)

    # Celery beat's Redis keys (celery-redbeat); separate prefixes keep deployments apart.
    redbeat_key_prefix: str = "responder:redbeat:"

    @field_validator("redact_keys", mode="before")
    @classmethod
    def _split_words(cls, value: object) -> object:
        if isinstance(value, str):
            return [word.strip() for word in value.split(",") if word.strip()]
        return value

    @field_validator("ingest_tokens", "operator_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            return [token.strip() for token in value.split(",") if token.strip()]
        return value


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
