"""Configuration: a TOML file plus ``TUNERD_*`` environment variables (pydantic-settings).

Precedence, highest first: environment, the TOML file, built-in defaults. The file is
``--config F``, else ``$TUNERD_CONFIG``, else ``~/.config/tunerd/tunerd.toml`` if it exists. A file
named explicitly must exist (pydantic-settings would silently skip it). The webhook URL is a
``SecretStr``: it never shows in a repr, a dump or a log line.

pydantic is imported only by the commands that need a configuration, so ``tunerd analyze LOG``
starts fast.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tunerd.configfile import config_path
from tunerd.params import TUNABLE
from tunerd.reader import DEFAULT_MAX_LINE_BYTES
from tunerd.timeparse import human_duration, parse_duration
from tunerd.verdict import VerdictSettings

if TYPE_CHECKING:
    from tunerd.targets import Targets

log = logging.getLogger("tunerd.config")


def _duration(value: Any) -> Any:
    return parse_duration(value) if isinstance(value, str) else value


def _within(low: timedelta, high: timedelta) -> AfterValidator:
    """A duration that makes sense for its key: ``verify_after = "0s"`` would extend an
    experiment by nothing, again and again; years overflow the clock arithmetic."""

    def check(value: timedelta) -> timedelta:
        if not low <= value <= high:
            raise ValueError(
                f"{human_duration(value.total_seconds())} is not between"
                f" {human_duration(low.total_seconds())} and {human_duration(high.total_seconds())}"
            )
        return value

    return AfterValidator(check)


_SECOND, _HOUR, _DAY = timedelta(seconds=1), timedelta(hours=1), timedelta(days=1)
VerifyAfter = Annotated[timedelta, BeforeValidator(_duration), _within(_SECOND, 90 * _DAY)]
Window = Annotated[timedelta, BeforeValidator(_duration), _within(_HOUR, 3660 * _DAY)]
Cooldown = Annotated[timedelta, BeforeValidator(_duration), _within(timedelta(0), 366 * _DAY)]


DISCORD_HOSTS: Final = frozenset(
    f"{prefix}{domain}"
    for prefix in ("", "ptb.", "canary.")
    for domain in ("discord.com", "discordapp.com")
)
_DISCORD_PATH: Final = re.compile(r"^/api(?:/v\d+)?/webhooks/\d+/[\w-]+/?$")


LOOPBACK: Final = frozenset({"127.0.0.1", "::1", "localhost"})


def webhook_problem(url: str, allow_any: bool) -> str | None:
    """Why ``url`` cannot be the webhook (None when it can). Never quotes the URL: its token is
    a secret. A Discord webhook (``https://discord.com/api/webhooks/ID/TOKEN``), or a relay on
    this machine (http(s) on a loopback address: the token cannot leave it); anything else
    needs ``allow_any_url``, and then at least http(s) and a host."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        return "the webhook URL is not a URL"
    if parts.scheme not in ("http", "https") or not host:
        return "the webhook URL must be http(s)://host/…"
    if allow_any or host in LOOPBACK:
        return None
    if parts.scheme != "https" or host not in DISCORD_HOSTS or not _DISCORD_PATH.match(parts.path):
        return (
            "the webhook URL is not a Discord webhook (https://discord.com/api/webhooks/ID/TOKEN);"
            " for a relay, set allow_any_url = true under [discord]"
        )
    return None


class ScriptSettings(BaseModel):
    """A cron whose parameters live in its wrapper script (switchback experiments)."""

    model_config = {"extra": "ignore"}

    cron: str
    path: Path
    patterns: dict[str, str] = {}
    """param -> a regular expression with one group around the number (defaults: both spellings)"""

    @field_validator("path")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, value: dict[str, str]) -> dict[str, str]:
        for param, pattern in value.items():
            if param not in TUNABLE:
                raise ValueError(f"{param!r} is not a tunable parameter ({', '.join(TUNABLE)})")
            try:
                groups = re.compile(pattern).groups
            except re.error as exc:
                raise ValueError(f"the {param} pattern is not a regular expression: {exc}") from exc
            if groups != 1:
                raise ValueError(f"the {param} pattern needs exactly one group, around the number")
        return value


class DiscordSettings(BaseModel):
    model_config = {"extra": "ignore"}

    webhook_url: SecretStr | None = None
    from_openclaw: bool = False
    """Use Level 1's own webhook: ``$OPENCLAW_DISCORD_WEBHOOK``, else ``webhook.url`` of
    ``~/.openclaw/monitoring.json`` (when ``webhook_url`` is not set)."""
    allow_any_url: bool = False
    """Accept a webhook that is neither Discord's nor on this machine (a relay elsewhere),
    http included."""

    @model_validator(mode="after")
    def _webhook(self) -> DiscordSettings:
        url = self.webhook_url.get_secret_value() if self.webhook_url is not None else ""
        if url and (problem := webhook_problem(url, self.allow_any_url)):
            raise ValueError(problem)
        return self

    def url(self) -> str | None:
        """The webhook, or None (notifications go to the log). Level 1's own one, read at each
        use, is checked here: an unusable one is said, once, and not used."""
        if self.webhook_url is not None:
            return self.webhook_url.get_secret_value() or None
        if self.from_openclaw:
            from tunerd.discord import openclaw_webhook

            url = openclaw_webhook(Path.home(), dict(os.environ))
            if url and (problem := webhook_problem(url, self.allow_any_url)):
                if problem not in _SAID:
                    _SAID.add(problem)
                    log.error("Level 1's webhook is not used: %s", problem)
                return None
            return url
        return None


_SAID: set[str] = set()


class OpenClawSettings(BaseModel):
    model_config = {"extra": "ignore", "validate_default": True}

    state: Path = Path("~/.openclaw/state/openclaw.sqlite")
    """OpenClaw's state database (before 2026.6: its ``~/.openclaw/cron`` folder), where the
    gateway keeps its native cron jobs' history; read-only, and only when it exists."""
    history: bool = True
    """Analyse the native jobs' runs beside the wrapper's log (false: the log only)."""
    cli: str = "openclaw"
    """The command that edits a native job (``CLI cron edit ID --timeout-seconds N``): a name
    on the PATH, or a path with arguments (``/opt/openclaw/bin/openclaw --profile work``).
    When it is not there, native jobs' changes are advised, not made."""

    @field_validator("cli")
    @classmethod
    def _command(cls, value: str) -> str:
        import shlex

        try:
            words = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cli {value!r}: {exc}") from None
        if not words:
            raise ValueError("cli is empty: name the openclaw command")
        return value

    @property
    def command(self) -> tuple[str, ...]:
        """The command's words, ``~`` in the program's path expanded (as ``state``'s is)."""
        import shlex

        program, *rest = shlex.split(self.cli)
        return (os.path.expanduser(program), *rest)

    @property
    def can_edit(self) -> bool:
        """Whether the command is there to change native jobs with."""
        from tunerd.targets.gateway import can_run

        return can_run(self.command)

    @field_validator("state")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()


class Settings(BaseSettings):
    """Every key of the configuration file (SPEC section 6)."""

    model_config = SettingsConfigDict(
        env_prefix="TUNERD_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )
    toml_path: ClassVar[Path | None] = None

    log_path: Path = Path("~/openclaw/logs/auto-retry.jsonl")
    state_dir: Path = Path("~/.local/state/tunerd")
    params_file: Path = Path("~/.config/tunerd/params.json")
    verify_after: VerifyAfter = timedelta(hours=24)
    max_line_bytes: Annotated[int, Field(ge=1024)] = DEFAULT_MAX_LINE_BYTES
    """Longer log lines are skipped (and reported); well above the wrapper's 10 MB output cap."""
    max_crons: Annotated[int, Field(ge=1)] = 10_000
    """Distinct cron names tracked; runs of more are counted but not analysed."""
    window: Window = timedelta(days=7)
    """The statistics window a tuning cycle analyses."""
    min_runs: Annotated[int, Field(ge=1)] = 30
    """Runs in the window below which a cron is not tuned."""
    cooldown: Cooldown = timedelta(days=14)
    """After a rollback or a rejection, the same change is not proposed again for this long."""
    split: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """Share of runs that get the treatment in an A/B experiment."""
    dry_run: bool = False
    """Propose and record, never write a target."""
    alpha: Annotated[float, Field(gt=0, lt=0.5)] = 0.015
    """Chance of committing a change that does not help, over all looks at one experiment."""
    max_extensions: Annotated[int, Field(ge=0, le=10)] = 2
    min_runs_per_arm: Annotated[int, Field(ge=2)] = 20
    min_improvement: Annotated[float, Field(ge=0, lt=1)] = 0.2
    """The primary metric must fall by at least this share, besides being significant."""
    scripts: list[ScriptSettings] = []
    schedule: str = "0 23 * * 0"
    """When the daemon runs the weekly tuning cycle (crontab: Sunday 23:00)."""
    timezone: str | None = None
    """IANA time zone of ``schedule`` (default: the machine's)."""
    discord: DiscordSettings = DiscordSettings()
    openclaw: OpenClawSettings = OpenClawSettings()

    @field_validator("log_path", "state_dir", "params_file")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        if cls.toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_path))
        return (*sources, file_secret_settings)

    @model_validator(mode="after")
    def _one_cron_per_file(self) -> Settings:
        """A script holds one set of parameters: two crons on one file (the user's own
        ``WRAPPER_MAP`` has such a pair) would run two experiments on the same line, and after
        one rolled back the other would report a value the file no longer holds."""
        crons: dict[str, int] = {}
        files: dict[tuple[Any, ...], list[ScriptSettings]] = {}
        for script in self.scripts:
            crons[script.cron] = crons.get(script.cron, 0) + 1
            files.setdefault(_file_key(script.path), []).append(script)
        for cron, count in crons.items():
            if count > 1:
                raise ValueError(f"cron {cron!r} has {count} [[scripts]] entries: give it one")
        params_key = _file_key(self.params_file)
        for key, entries in files.items():
            names = ", ".join(repr(e.cron) for e in entries)
            if key == params_key:
                raise ValueError(
                    f"{entries[0].path} is the params_file and the script of {names}: a script"
                    " target must be a file of its own"
                )
            if len(entries) > 1:
                raise ValueError(
                    f"{entries[0].path} is the script of {len(entries)} crons ({names}): one file"
                    " holds one set of parameters, so tunerd cannot tune them apart (both"
                    " experiments would write the same line); keep one [[scripts]] entry per file"
                    " and leave the other crons to the params file, or give each cron its own"
                    " script (docs/wrapper.md, shared scripts)"
                )
        return self

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str | None:
        if value is not None:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"{value!r} is not a known time zone (e.g. Asia/Seoul)") from None
        return value

    @model_validator(mode="after")
    def _schedule(self) -> Settings:
        """The weekly schedule is checked with the time zone it runs in, here, so that ``run``,
        ``cycle``, ``status`` and SIGHUP accept and refuse the same configurations."""
        from zoneinfo import ZoneInfo

        from tunerd.schedule import cron_trigger

        try:
            cron_trigger(self.schedule, ZoneInfo(self.timezone or "UTC"))
        except ValueError as exc:
            raise ValueError(f"schedule {self.schedule!r}: {exc}") from None
        return self

    def targets(self, params_file: Path | None = None) -> Targets:
        """The configured targets: each ``[[scripts]]`` entry, and the params file for the rest."""
        from tunerd.targets import (
            DEFAULT_PATTERNS,
            Gateway,
            ParamsFileTarget,
            ScriptTarget,
            Targets,
        )

        scripts = {
            s.cron: ScriptTarget(s.path, s.cron, {**DEFAULT_PATTERNS, **s.patterns})
            for s in self.scripts
        }
        gateway = (
            Gateway(self.openclaw.state, self.openclaw.command) if self.openclaw.history else None
        )
        return Targets(ParamsFileTarget(params_file or self.params_file), scripts, gateway)

    def verdict_settings(self) -> VerdictSettings:
        return VerdictSettings(
            alpha=self.alpha,
            max_extensions=self.max_extensions,
            min_runs=self.min_runs_per_arm,
            min_improvement=self.min_improvement,
        )


def _file_key(path: Path) -> tuple[Any, ...]:
    """The same file under any spelling: its device and inode when it exists, else its
    resolved path."""
    try:
        st = path.stat()
    except OSError:
        return ("path", str(path.resolve()))
    return ("inode", st.st_dev, st.st_ino)


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


def load(explicit: str | None = None) -> Settings:
    path, named = config_path(explicit)
    if path is not None and named and not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist (or is not a file)")

    class _FromFile(Settings):
        toml_path = path

    try:
        settings = _FromFile()
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}: {problems(exc)}") from None
    except (OSError, ValueError) as exc:  # unreadable file, TOML syntax
        raise ConfigError(f"cannot read configuration {path}: {exc}") from None
    if path is not None:
        for key in unknown_keys(path):
            log.warning("configuration %s: unknown key %r ignored (a typo?)", str(path), key)
    return settings


def problems(exc: ValidationError) -> str:
    """Each invalid key and why, in one line a person can act on."""
    out = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e["loc"]) or "configuration"
        out.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(out)


def unknown_keys(path: Path) -> list[str]:
    """Keys of the file no setting reads: ignored, so that a newer file still loads, but named."""
    with path.open("rb") as f:
        document = tomllib.load(f)
    models: dict[str, type[BaseModel]] = {"": Settings, "discord": DiscordSettings}
    unknown = []
    for key, value in document.items():
        if key not in Settings.model_fields:
            unknown.append(key)
        elif key in models and isinstance(value, dict):
            unknown += [f"{key}.{k}" for k in value if k not in models[key].model_fields]
        elif key == "scripts" and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    known = ScriptSettings.model_fields
                    unknown += [f"scripts[{i}].{k}" for k in item if k not in known]
    return unknown
