"""The responder config file: allowlist, declared commands and rules, validated as a whole.

Unknown keys are errors at every level, and every problem is reported with the rule and field
it belongs to, so ``responder config check`` reads like a compiler's error list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from celery.schedules import crontab
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from remediations import (
    CommandSpec,
    RemediationContext,
    ResponderError,
    get_remediation,
    registered,
)
from remediations.base import Duration
from remediations.commands import is_template
from workers.matching import Matcher, MatcherError, matches, parse_matcher
from workers.templating import RenderError, check_syntax, render_value, template_context


class ConfigError(ResponderError):
    """The config is invalid; ``problems`` lists each error as ``location: message``."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = list(problems)


# A grace period is kept in the ledger (a waiting run), so it may be long; a day bounds typos.
MAX_GRACE_S = 86400.0


# Windows of cooldowns and budgets are kept in Redis and rebuilt from the ledger: a week at most.
MAX_WINDOW_S = 7 * 86400.0
_LABEL_NAME = r"^[a-zA-Z_][a-zA-Z0-9_]*$"


class Action(BaseModel):
    """A remediation with params, run for an event rather than for a firing alert: a rule's
    ``on_resolved``, or the ``escalation`` target."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    remediation: str
    params: dict[str, Any] = Field(default_factory=dict)
    target: str | None = Field(default=None, min_length=1, max_length=500)


class Budget(BaseModel):
    """At most ``count`` runs per ``per`` (a sliding window)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(ge=1, le=1_000_000)
    per: Duration = Field(le=MAX_WINDOW_S)


class Breaker(BaseModel):
    """A circuit breaker per (remediation, target): open after ``failures`` consecutive counted
    failures, for ``cool_down``; then one probe decides (``workers.breakers``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    failures: int = Field(default=3, ge=1, le=1000)
    cool_down_s: Duration = Field(default=600.0, alias="cool_down", le=MAX_WINDOW_S)


class Repeat(BaseModel):
    """Run again while the alert's episode is still unresolved ``after`` the last succeeded run,
    at most ``max`` extra times."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    after_s: Duration = Field(alias="after", le=MAX_WINDOW_S)
    max: int = Field(ge=1, le=100)


class RemediationSettings(BaseModel):
    """Settings of every run of one remediation (``remediations.NAME``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    breaker: Breaker | None = None


class Limits(BaseModel):
    """Limits over every rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # All alert runs of all rules together.
    max_runs: Budget | None = None
    # All escalations together (each is also at most once per budget window, breaker opening or
    # ineffective episode); past it they are recorded skipped (budget).
    max_escalations: Budget | None = None
    # When the cooldown and budget state cannot be read (Redis unreachable, or emptied and not
    # yet rebuilt from the ledger): a destructive remediation is always refused
    # (``guard_state_unavailable``); a non-destructive one runs (``run``) or is refused too.
    non_destructive_without_guard_state: Literal["run", "skip"] = "run"


class Rule(BaseModel):
    """Which alerts (``match``) get which remediation, with which params, in which mode.

    The guards a rule configures (``workers.admission``): ``enabled: false`` records every
    matching alert as skipped (``disabled``); ``for: 2m`` waits in the ledger and acts only if
    the alert is still firing after it; ``on_resolved`` runs when the alert resolves.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")
    match: list[str] = Field(min_length=1)
    remediation: str
    params: dict[str, Any] = Field(default_factory=dict)
    mode: Literal["enforce", "dry_run"] = "enforce"
    # What the run acts on, overriding the remediation's declaration: a template over the
    # alert (``labels``, ``annotations``, ``alert``) and ``params``, e.g. "{{ labels.instance }}".
    target: str | None = Field(default=None, min_length=1, max_length=500)
    enabled: bool = True
    # ``for`` in the file (a Python keyword here): the grace period, in seconds.
    grace_s: Duration | None = Field(default=None, alias="for", le=MAX_GRACE_S)
    on_resolved: Action | None = None
    # At most one run per ``cooldown`` for each value of the ``group_by`` labels (all runs of
    # the rule when empty). A label must be named by one of the rule's matchers, so that every
    # matching alert has it, or be listed in ``group_by_optional`` (missing means "").
    cooldown_s: Duration | None = Field(default=None, alias="cooldown", le=MAX_WINDOW_S)
    group_by: list[Annotated[str, Field(pattern=_LABEL_NAME)]] = Field(default_factory=list)
    group_by_optional: list[Annotated[str, Field(pattern=_LABEL_NAME)]] = Field(default_factory=list)
    max_runs: Budget | None = None
    # This rule's breakers (default: the config's ``breaker``).
    breaker: Breaker | None = None
    # At most ``concurrency`` runs act on one target at a time (across rules and workers); a run
    # that finds them all taken waits up to ``lock_wait`` (re-delivered, not blocking a worker)
    # and is then skipped (``locked``).
    concurrency: int = Field(default=1, ge=1, le=1000)
    lock_wait_s: Duration | None = Field(default=None, alias="lock_wait", le=3600.0)
    # A succeeded run whose alert still fires ``verify_within`` later (its episode unresolved, or
    # a new episode of the same alert begun) is ineffective: a breaker failure, and escalated.
    verify_within_s: Duration | None = Field(default=None, alias="verify_within", le=MAX_WINDOW_S)
    repeat: Repeat | None = None
    _matchers: tuple[Matcher, ...] = PrivateAttr(default=())

    @field_validator("match")
    @classmethod
    def _parse_matchers(cls, values: list[str]) -> list[str]:
        problems = []
        for index, text in enumerate(values):
            try:
                parse_matcher(text)
            except MatcherError as exc:
                problems.append(f"[{index}] {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        return values

    def model_post_init(self, _context: Any, /) -> None:
        """Parse the matchers once."""
        self._matchers = tuple(parse_matcher(text) for text in self.match)

    @property
    def matchers(self) -> tuple[Matcher, ...]:
        """The parsed matchers."""
        return self._matchers

    def applies_to(self, labels: Mapping[str, str]) -> bool:
        """Whether every matcher of this rule holds for the label set."""
        return matches(labels, self._matchers)


class Schedule(BaseModel):
    """A remediation run on a timetable (by beat): ``every`` (a duration) or ``cron`` (five
    fields: minute hour day-of-month month day-of-week, in UTC), with static params (secrets
    allowed, no alert data). Its runs are recorded like any other (trigger ``schedule``, the
    schedule's name as ``rule``), one run of a schedule at a time (``workers.schedules``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")
    every_s: Duration | None = Field(default=None, alias="every", ge=1.0, le=MAX_WINDOW_S)
    cron: str | None = None
    remediation: str
    params: dict[str, Any] = Field(default_factory=dict)
    mode: Literal["enforce", "dry_run"] = "enforce"
    enabled: bool = True
    # A backup schedule's last success older than this is stale (``ResponderBackupStale``);
    # by default twice ``every``. A cron schedule states it.
    stale_after_s: Duration | None = Field(default=None, alias="stale_after", le=400 * 86400.0)

    @field_validator("cron")
    @classmethod
    def _parse_cron(cls, value: str | None) -> str | None:
        if value is not None:
            crontab_of(value)
        return value

    @model_validator(mode="after")
    def _one_timetable(self) -> Schedule:
        if (self.every_s is None) == (self.cron is None):
            raise ValueError("give exactly one of every and cron")
        if self.cron is not None and self.stale_after_s is None:
            raise ValueError("a cron schedule needs stale_after (how old its last success may get)")
        return self

    @property
    def stale_after(self) -> float:
        """Seconds after which a last success is stale."""
        return self.stale_after_s or 2 * (self.every_s or 0.0)

    @property
    def timetable(self) -> str:
        """``every 3600s`` or ``cron 15 3 * * *``, as shown to people."""
        return f"every {self.every_s:g}s" if self.every_s is not None else f"cron {self.cron}"


def crontab_of(text: str) -> crontab:
    """Celery's crontab for a five-field cron line; ValueError when it is not one."""
    fields = text.split()
    if len(fields) != 5:
        raise ValueError("cron needs five fields: minute hour day-of-month month day-of-week")
    minute, hour, day_of_month, month, day_of_week = fields
    try:
        return crontab(
            minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month, day_of_week=day_of_week
        )
    except (ValueError, KeyError) as exc:
        raise ValueError(f"not a cron line: {text!r} ({exc})") from exc


class ResponderConfig(BaseModel):
    """The whole config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    http_allowlist: list[str] = Field(default_factory=list)
    commands: dict[str, CommandSpec] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    # Breakers of rules that set none: per remediation, else this default.
    breaker: Breaker = Field(default_factory=Breaker)
    remediations: dict[str, RemediationSettings] = Field(default_factory=dict)
    # Run when a budget is exhausted (once per rule and window, not once per alert) and when a
    # breaker opens (once per opening).
    escalation: Action | None = None
    # Remediations run on a timetable (database backups above all).
    schedules: list[Schedule] = Field(default_factory=list)

    def context(self, **overrides: Any) -> RemediationContext:
        """A remediation context carrying this config's allowlist and commands."""
        return RemediationContext(
            http_allowlist=tuple(self.http_allowlist),
            commands=self.commands,
            **overrides,
        )

    def matching_rules(self, labels: Mapping[str, str]) -> list[Rule]:
        """The rules whose matchers all hold for the label set, in file order."""
        return [rule for rule in self.rules if rule.applies_to(labels)]

    def rule(self, name: str) -> Rule | None:
        """The rule called ``name``, if any."""
        return next((rule for rule in self.rules if rule.name == name), None)

    def schedule(self, name: str) -> Schedule | None:
        """The schedule called ``name``, if any."""
        return next((schedule for schedule in self.schedules if schedule.name == name), None)

    def breaker_of(self, rule: str | None, remediation: str) -> Breaker:
        """The breaker settings of a run: its rule's, else its remediation's, else the default."""
        found = self.rule(rule) if rule else None
        if found is not None and found.breaker is not None:
            return found.breaker
        settings = self.remediations.get(remediation)
        return settings.breaker if settings is not None and settings.breaker is not None else self.breaker

    @property
    def disabled_rules(self) -> frozenset[str]:
        """Names of the rules with ``enabled: false``."""
        return frozenset(rule.name for rule in self.rules if not rule.enabled)


def _location(loc: Sequence[int | str], raw: Any) -> str:
    """``('rules', 0, 'params')`` -> ``rules[0] (probe-http).params``."""
    text = ""
    node = raw
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, dict) and isinstance(node.get("name"), str):
                text += f" ({node['name']})"
        else:
            text += f".{part}" if text else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return text


def _static_problems(config: ResponderConfig) -> list[str]:
    """Problems a config has for every alert: names, remediations, params, templates."""
    problems: list[str] = []
    for name, spec in config.commands.items():
        if is_template(spec.argv[0]):
            problems.append(f"commands.{name}.argv[0]: the program must be a literal path")
        try:
            check_syntax(spec.argv, f"commands.{name}.argv")
        except RenderError as exc:
            problems.append(str(exc))
    seen: set[str] = set()
    for index, rule in enumerate(config.rules):
        where = f"rules[{index}] ({rule.name})"
        if rule.name in seen:
            problems.append(f"{where}.name: duplicate rule name")
        seen.add(rule.name)
        if rule.remediation not in registered():
            known = ", ".join(sorted(registered()))
            problems.append(f"{where}.remediation: unknown remediation {rule.remediation!r} (known: {known})")
            continue
        try:
            check_syntax(rule.params, f"{where}.params")
            if rule.target is not None:
                check_syntax(rule.target, f"{where}.target")
        except RenderError as exc:
            problems.append(str(exc))
            continue
        problems.extend(_params_problems(config, rule.remediation, rule.params, where))
        if rule.on_resolved is not None:
            problems.extend(_action_problems(config, rule.on_resolved, f"{where}.on_resolved"))
        problems.extend(_group_problems(rule, where))
    if config.escalation is not None:
        problems.extend(_action_problems(config, config.escalation, "escalation"))
    for index, schedule in enumerate(config.schedules):
        where = f"schedules[{index}] ({schedule.name})"
        if schedule.name in seen:
            problems.append(f"{where}.name: already the name of a rule or schedule")
        seen.add(schedule.name)
        problems.extend(_schedule_problems(config, schedule, where))
    for name in sorted(set(config.remediations) - set(registered())):
        problems.append(
            f"remediations.{name}: unknown remediation (known: {', '.join(sorted(registered()))})"
        )
    return problems


def _group_problems(rule: Rule, where: str) -> list[str]:
    """A cooldown's group labels must be guaranteed by the rule's matchers or declared optional."""
    problems: list[str] = []
    matched = {matcher.name for matcher in rule.matchers}
    optional = set(rule.group_by_optional)
    for label in rule.group_by:
        if label not in matched and label not in optional:
            problems.append(
                f"{where}.group_by: label {label!r} is not named by any matcher of the rule; match it "
                f"(e.g. '{label}!=\"\"') or list it in group_by_optional"
            )
    for label in sorted(optional - set(rule.group_by)):
        problems.append(f"{where}.group_by_optional: label {label!r} is not in group_by")
    if (rule.group_by or rule.group_by_optional) and rule.cooldown_s is None:
        problems.append(f"{where}.group_by: needs a cooldown (it groups the cooldown's runs)")
    return problems


def _action_problems(config: ResponderConfig, action: Action, where: str) -> list[str]:
    if action.remediation not in registered():
        known = ", ".join(sorted(registered()))
        return [f"{where}.remediation: unknown remediation {action.remediation!r} (known: {known})"]
    try:
        check_syntax(action.params, f"{where}.params")
        if action.target is not None:
            check_syntax(action.target, f"{where}.target")
    except RenderError as exc:
        return [str(exc)]
    return _params_problems(config, action.remediation, action.params, where)


def _schedule_problems(config: ResponderConfig, schedule: Schedule, where: str) -> list[str]:
    """A schedule has no alert: its params render now (a template over alert data is an
    error here, not at its first tick) and are checked whole."""
    if schedule.remediation not in registered():
        known = ", ".join(sorted(registered()))
        return [f"{where}.remediation: unknown remediation {schedule.remediation!r} (known: {known})"]
    try:
        rendered = render_value(schedule.params, template_context(None), f"{where}.params")
    except RenderError as exc:
        return [str(exc)]
    return _params_problems(config, schedule.remediation, rendered, where)


def _params_problems(config: ResponderConfig, remediation: str, raw: dict[str, Any], where: str) -> list[str]:
    definition = get_remediation(remediation)
    fields = definition.params_model.model_fields
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    unknown = sorted(set(raw) - known)
    if unknown:
        return [f"{where}.params.{key}: unknown param for {remediation}" for key in unknown]
    if any(isinstance(v, str) and is_template(v) for v in _strings(raw)):
        return []  # needs alert data: checked fully by `config test` and at plan time
    try:
        # ``{secret: NAME}`` stands for a whole param: checked as its reference will be.
        params = definition.validate(render_value(raw, {}))
        # Arguments of commands take alert data; a placeholder stands in for it here.
        definition.preflight(config.context(render=lambda _: "placeholder"), params)
    except ValidationError as exc:
        return [f"{where}.params.{_location(e['loc'], {})}: {e['msg']}" for e in exc.errors()]
    except ResponderError as exc:  # RenderError among them
        return [f"{where}.params: {exc}"]
    return []


def _strings(value: Any) -> list[Any]:
    if isinstance(value, Mapping):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [value]


def parse_config(raw: Any, source: str = "<config>") -> ResponderConfig:
    """Validate already-parsed YAML; raises ConfigError listing every problem found."""
    if raw is None:
        raw = {}
    try:
        config = ResponderConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{_location(e['loc'], raw)}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(source, problems) from exc
    problems = _static_problems(config)
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config(path: Path) -> ResponderConfig:
    """Read and validate a YAML config file; raises ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror or exc}"]) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"invalid YAML: {exc}"]) from exc
    return parse_config(raw, str(path))


@lru_cache(maxsize=8)
def cached_config(path: Path) -> ResponderConfig:
    """The config at ``path``, loaded once per process (restart to pick up changes)."""
    return load_config(path)
