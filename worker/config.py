"""The configuration tree: declared once, loaded from TOML, then the environment, then flags.

Each option is a dataclass field whose metadata names its environment variable, the unit that
variable uses, whether it is also a command-line flag, and its bounds. Everything else (env
parsing, flag parsing, validation messages) is derived from those declarations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from worker.errors import ConfigError
from worker.targets import check_header_target, header_problems, parse_entry

DEFAULT_PATH = Path("/etc/base-worker/config.toml")
# Keys that config.example.toml ships with; a daemon using them warns loudly at startup.
DEV_ONLY_KEYS = frozenset({"dev-only-auth-key", "dev-only-lb-key"})
STRONG_KEY_LENGTH = 16  # characters; a shorter key is accepted with a warning

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "console", "json", "journal"]
Unit = Literal["ms", "size", "json", "list"]


def option(
    default: Any,
    *,
    env: str | None = None,
    unit: Unit | None = None,
    flag: bool | str = False,
    minimum: float | None = None,
    maximum: float | None = None,
    secret: bool = False,
    restart: bool = False,
    help: str = "",
) -> Any:
    """Declare one option: default, environment variable, unit, bounds; `flag` True or "--name";
    a `secret` option's value is never repeated in an error message; a `restart` option is read
    only at start-up, so a reload that changes it says that a restart is needed."""
    meta = {"env": env, "unit": unit, "flag": flag, "min": minimum, "max": maximum, "help": help}
    meta.update(secret=secret, restart=restart)
    if isinstance(default, dict):
        frozen = types.MappingProxyType(dict(default))
        return field(default_factory=lambda: frozen, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class WorkerSection:
    group: str = option("default", env="GROUP", help="routing group")
    contract: int = option(1, env="CONTRACT", minimum=1, help="contract version")
    slots: int = option(10, env="SLOTS", flag=True, minimum=1, help="parallel tasks")
    max_queue: int = option(10000, env="MAX_QUEUE", minimum=0, help="queued tasks beyond slots")
    default_timeout: float = option(30.0, env="DEFAULT_TIMEOUT", unit="ms", minimum=0.001)
    drain_timeout: float = option(60.0, minimum=0)
    drain_grace: float = option(0.0, env="DRAIN_GRACE", minimum=0)
    service_start_timeout: float = option(60.0, minimum=0.001)
    functions: tuple[str, ...] = option(("worker.examples",), restart=True)
    # systemd's StateDirectory= sets $STATE_DIRECTORY, so the unit needs no extra setting.
    state_dir: str = option("", env="STATE_DIRECTORY", restart=True)


@dataclass(frozen=True)
class HttpSection:
    host: str = option("127.0.0.1", env="HOST", flag=True, restart=True, help="listen address")
    port: int = option(
        3000, env="PORT", flag=True, minimum=0, maximum=65535, restart=True, help="listen port"
    )
    max_body_size: int = option(
        10 * 1024 * 1024, env="REQUEST_BODY_LIMIT", unit="size", minimum=1, restart=True
    )
    openapi: bool = option(True, env="OPENAPI_ENABLED", restart=True)
    # The connection edge (docs/systemd.md, "Connections and open files").
    header_timeout: float = option(
        10.0, minimum=0.001, restart=True, help="seconds to receive a request line and headers"
    )
    body_timeout: float = option(30.0, minimum=0.001, help="seconds to receive a request body")
    keepalive_timeout: float = option(
        75.0, minimum=0, restart=True, help="seconds an idle connection is kept between requests"
    )
    max_connections: int = option(
        10000, minimum=1, restart=True, help="open client connections at once"
    )


@dataclass(frozen=True)
class AuthSection:
    auth_key: str = option("", env="AUTH_KEY", secret=True)
    lb_auth_key: str = option("", env="LB_AUTH_KEY", secret=True)
    # A path, not a secret: the keys it holds override auth_key and lb_auth_key of the file.
    keys_file: str = option("", help="TOML file holding auth_key and lb_auth_key")


@dataclass(frozen=True)
class LoggingSection:
    level: LogLevel = option("info", env="LOG_LEVEL", flag="--log-level", help="log level")
    max_lines: int = option(1000, env="MAX_LOGS", minimum=1)
    format: LogFormat = option("auto", restart=True, help="log output format")
    access: bool = option(False, help="one line per HTTP request")


@dataclass(frozen=True)
class WebhookSection:
    timeout: float = option(5.0, env="WEBHOOK_TIMEOUT", unit="ms", minimum=0.001)
    max_retries: int = option(3, env="WEBHOOK_MAX_RETRIES", minimum=0)
    retry_delay: float = option(1.0, env="WEBHOOK_RETRY_DELAY", unit="ms", minimum=0)
    headers: Mapping[str, str] = option({}, env="WEBHOOK_HEADERS", unit="json", secret=True)
    secret: str = option("", secret=True)
    max_result_bytes: int = option(
        10 * 1024 * 1024, env="WEBHOOK_MAX_RESULT_BYTES", unit="size", minimum=1
    )
    # Webhook tasks accepted but not yet delivered; bounds memory at max_pending x max_result_bytes.
    max_pending: int = option(10000, env="WEBHOOK_MAX_PENDING", minimum=1)
    # Host names, IP addresses or CIDR networks; empty allow = any target not denied.
    allow: tuple[str, ...] = option((), env="WEBHOOK_ALLOW", unit="list")
    deny: tuple[str, ...] = option((), env="WEBHOOK_DENY", unit="list")
    # URL prefixes: the configured headers (often credentials) are sent only to these targets.
    header_targets: tuple[str, ...] = option((), env="WEBHOOK_HEADER_TARGETS", unit="list")
    # Seconds a delivered task stays in the journal (its Idempotency-Key is remembered as long).
    retention: float = option(86400.0, env="WEBHOOK_RETENTION", minimum=1, restart=True)


@dataclass(frozen=True)
class LoadBalancerSection:
    websocket_port: int = option(3001, env="WEBSOCKET_PORT", minimum=0, maximum=65535, restart=True)
    url: str = option("", env="LB_URL")
    advertise_url: str = option("", env="ADVERTISE_URL")


@dataclass(frozen=True)
class Config:
    worker: WorkerSection = field(default_factory=WorkerSection)
    http: HttpSection = field(default_factory=HttpSection)
    auth: AuthSection = field(default_factory=AuthSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    webhook: WebhookSection = field(default_factory=WebhookSection)
    load_balancer: LoadBalancerSection = field(default_factory=LoadBalancerSection)

    @property
    def uses_dev_keys(self) -> bool:
        return bool({self.auth.auth_key, self.auth.lb_auth_key} & DEV_ONLY_KEYS)

    def weak_keys(self) -> list[str]:
        """The names of the keys set but shorter than STRONG_KEY_LENGTH."""
        keys = {"auth.auth_key": self.auth.auth_key, "auth.lb_auth_key": self.auth.lb_auth_key}
        return [name for name, key in keys.items() if 0 < len(key) < STRONG_KEY_LENGTH]

    def secrets(self) -> frozenset[str]:
        """Values that must never appear in a log line or an error message."""
        values = {self.auth.auth_key, self.auth.lb_auth_key, self.webhook.secret}
        values.update(self.webhook.headers.values())
        return frozenset(v for v in values if v)


@dataclass(frozen=True)
class Option:
    """One declared option, as the loaders and the command line see it."""

    section: str
    key: str
    type: Any
    meta: Mapping[str, Any]

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def flag(self) -> str:
        named = self.meta["flag"]
        return named if isinstance(named, str) else "--" + self.key.replace("_", "-")


def value_of(cfg: Config, opt: Option) -> Any:
    return getattr(getattr(cfg, opt.section), opt.key)


def changed(old: Config, new: Config) -> list[str]:
    """The names of the options whose value differs, in declaration order."""
    return [opt.name for opt in options() if value_of(old, opt) != value_of(new, opt)]


def needs_restart(old: Config, new: Config) -> list[str]:
    """The changed options that are read only at start-up."""
    return [
        opt.name
        for opt in options()
        if opt.meta["restart"] and value_of(old, opt) != value_of(new, opt)
    ]


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def options() -> list[Option]:
    """Every option of the tree, in declaration order."""
    found = []
    for section, cls in _section_types().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            found.append(Option(section, f.name, hints[f.name], f.metadata))
    return found


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list of strings"
    if tp == Mapping[str, str]:  # get_type_hints builds a new alias each time
        return "a table of strings"
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}[tp]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}


def parse_size(text: str) -> int:
    """`10mb`, `512kb`, `1024` -> bytes (1 kb = 1024 bytes)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size such as 10mb, 512kb or 1048576")
    number, suffix = match.groups()
    return int(float(number) * _SIZE_FACTORS[(suffix or "b").lower()])


def parse_text(opt: Option, text: str) -> Any:
    """Turn an environment variable or flag into the option's value, in the option's units."""
    unit = opt.meta["unit"]
    if unit == "ms":
        return float(text) / 1000.0
    if unit == "size":
        return parse_size(text)
    if unit == "json":
        return json.loads(text)
    if typing.get_origin(opt.type) is Literal:
        # Andera's .env writes LOG_LEVEL=warn, in any case.
        chosen = text.strip().lower()
        return "warning" if chosen == "warn" and "warning" in typing.get_args(opt.type) else chosen
    if opt.type is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not a boolean (true or false)")
    if opt.type is int:
        return int(text)
    if opt.type is float:
        return float(text)
    if typing.get_origin(opt.type) is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return text


def _check(opt: Option, value: Any) -> Any:
    """Validate one value against its declaration; return it in canonical (immutable) form."""
    tp = opt.type
    problem = f"{opt.name} must be {_type_name(tp)}"
    shown = "a value of another type" if opt.meta["secret"] else repr(value)
    if typing.get_origin(tp) is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{problem}, not {shown}")
        return value
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(problem)
        return tuple(value)
    if tp == Mapping[str, str]:
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(problem)
        return types.MappingProxyType(dict(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is int and opt.meta["unit"] == "size" and isinstance(value, str):
        try:
            value = parse_size(value)
        except ValueError as exc:
            raise ConfigError(f"{opt.name}: {exc}") from None
    if type(value) is not tp or (tp is float and math.isnan(value)):
        raise ConfigError(f"{problem}, not {shown}")  # nan would slip past the bounds below
    low, high = opt.meta["min"], opt.meta["max"]
    if low is not None and value < low:
        raise ConfigError(f"{opt.name} must be at least {low}, not {shown}")
    if high is not None and value > high:
        raise ConfigError(f"{opt.name} must be at most {high}, not {shown}")
    return value


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; any problem becomes a one-line ConfigError naming the file."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


KEYS_FILE_KEYS = ("auth_key", "lb_auth_key")


def _with_keys_file(file_values: dict[str, Any], config_path: Path | None) -> dict[str, Any]:
    """The file's values with `auth.keys_file`'s keys laid over `[auth]`; a relative path is
    relative to the config file. Errors name the file and the key, never a value."""
    auth = file_values.get("auth", {})
    name = auth.get("keys_file", "")
    if not isinstance(name, str) or not name:
        return file_values  # not a string: the declared option's check reports it
    path = Path(name)
    if not path.is_absolute() and config_path is not None:
        path = config_path.parent / path
    try:
        with path.open("rb") as handle:
            keys = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"auth.keys_file: cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"auth.keys_file: {path} is not valid TOML: {exc}") from None
    for key, value in keys.items():
        if key not in KEYS_FILE_KEYS:
            allowed = ", ".join(KEYS_FILE_KEYS)
            raise ConfigError(f"auth.keys_file: unknown key {key} in {path} (allowed: {allowed})")
        if not isinstance(value, str):
            raise ConfigError(f"auth.keys_file: {key} in {path} must be a string")
    return {**file_values, "auth": {**auth, **keys}}


def default_path(environ: Mapping[str, str]) -> Path | None:
    """The config file used without --config: $BASE_WORKER_CONFIG, else the system path if any."""
    if environ.get("BASE_WORKER_CONFIG"):
        return Path(environ["BASE_WORKER_CONFIG"])
    return DEFAULT_PATH if DEFAULT_PATH.exists() else None


def load(
    path: Path | None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Build the validated tree: defaults < file < environment < flags (keyed `section.key`)."""
    environ = os.environ if environ is None else environ
    flags = flags or {}
    file_values = read_toml(path) if path is not None else {}
    known = {opt.section for opt in options()}
    for section, table in file_values.items():
        if section not in known:
            raise ConfigError(f"unknown section [{section}] (known: {', '.join(sorted(known))})")
        if not isinstance(table, dict):
            raise ConfigError(f"{section} must be a table ([{section}])")
    file_values = _with_keys_file(file_values, path)

    chosen: dict[str, dict[str, Any]] = {section: {} for section in known}
    declared: dict[str, set[str]] = {section: set() for section in known}
    for opt in options():
        declared[opt.section].add(opt.key)
        table = file_values.get(opt.section, {})
        if opt.key in table:
            chosen[opt.section][opt.key] = _check(opt, table[opt.key])
        env_name = opt.meta["env"]
        if env_name and environ.get(env_name, "") != "":
            try:
                parsed = parse_text(opt, environ[env_name])
            except ValueError as exc:
                raise ConfigError(f"{opt.name} (from ${env_name}): {exc}") from None
            chosen[opt.section][opt.key] = _check(opt, parsed)
        if flags.get(opt.name) is not None:
            chosen[opt.section][opt.key] = _check(opt, flags[opt.name])
    for section, table in file_values.items():
        unknown = sorted(set(table) - declared[section])
        if unknown:
            raise ConfigError(f"unknown key {section}.{unknown[0]} in the config file")

    sections = _section_types()
    config = Config(**{name: sections[name](**chosen[name]) for name in sections})
    _check_whole(config)
    return config


def _check_whole(config: Config) -> None:
    if not config.auth.auth_key:
        raise ConfigError("auth.auth_key is required (set AUTH_KEY or [auth] auth_key)")
    if not config.worker.functions:
        raise ConfigError("worker.functions must name at least one module, file or directory")
    problems = header_problems(config.webhook.headers)
    if problems:
        raise ConfigError(f"webhook.headers: {' '.join(problems)}")
    for key in ("allow", "deny"):
        for entry in getattr(config.webhook, key):
            try:
                parse_entry(entry)
            except ValueError as exc:
                raise ConfigError(f"webhook.{key}: {exc}") from None
    for prefix in config.webhook.header_targets:
        try:
            check_header_target(prefix)
        except ValueError as exc:
            raise ConfigError(f"webhook.header_targets: {exc}") from None
    for name in ("url", "advertise_url"):
        value = getattr(config.load_balancer, name)
        if value and not re.match(r"^(wss?|https?)://", value):
            raise ConfigError(
                f"load_balancer.{name} must be a ws://, wss://, http:// or https:// URL"
            )
