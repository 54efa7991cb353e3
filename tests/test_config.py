"""The configuration tree: file < environment < flags, units, and one-line errors naming the key."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AUTH_KEY, ROOT, make_config
from worker import cli, config
from worker.errors import ConfigError

# A file that is valid as is; each bad case below changes one thing.
GOOD = f"""
[worker]
slots = 3
functions = ["worker.examples"]

[http]
host = "127.0.0.1"
port = 0

[auth]
auth_key = "{AUTH_KEY}"

[load_balancer]
websocket_port = 0
"""

# Names the daemon reads from its environment: none may leak in from the test's own.
DAEMON_ENV = {opt.meta["env"] for opt in config.options() if opt.meta["env"]} | {
    "BASE_WORKER_CONFIG",
    "NOTIFY_SOCKET",
    "LISTEN_PID",
    "LISTEN_FDS",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DAEMON_ENV}
    env.update(extra)
    return env


def clear_daemon_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Leave no variable of the daemon's in this process's environment."""
    for name in DAEMON_ENV:
        monkeypatch.delenv(name, raising=False)


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> config.Config:
    return config.load(write(tmp_path, text), environ or {})


# --- precedence and units ------------------------------------------------------------------------


def test_defaults_with_only_the_required_key() -> None:
    cfg = config.load(None, {"AUTH_KEY": "k"})
    assert cfg.worker == config.WorkerSection()
    assert cfg.worker.slots == 10 and cfg.worker.max_queue == 10000
    assert cfg.worker.default_timeout == 30.0
    assert cfg.http.host == "127.0.0.1" and cfg.http.port == 3000
    assert cfg.http.max_body_size == 10 * 1024 * 1024
    assert cfg.logging.level == "info"
    assert cfg.auth.auth_key == "k"


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert config.load(path, {}).worker.slots == 3
    assert config.load(path, {"SLOTS": "7"}).worker.slots == 7
    assert config.load(path, {"SLOTS": "7"}, {"worker.slots": 9}).worker.slots == 9
    assert config.load(path, {"SLOTS": ""}).worker.slots == 3  # an empty variable is unset


def test_environment_names_and_units(tmp_path: Path) -> None:
    environ = {
        "AUTH_KEY": "env-auth",
        "LB_AUTH_KEY": "env-lb",
        "PORT": "4100",
        "HOST": "::1",
        "WEBSOCKET_PORT": "4101",
        "GROUP": "gpu",
        "CONTRACT": "4",
        "SLOTS": "5",
        "MAX_QUEUE": "6",
        "DEFAULT_TIMEOUT": "1500",  # ms
        "LOG_LEVEL": "debug",
        "MAX_LOGS": "50",
        "WEBHOOK_TIMEOUT": "2500",  # ms
        "WEBHOOK_MAX_RETRIES": "7",
        "WEBHOOK_RETRY_DELAY": "250",  # ms
        "WEBHOOK_HEADERS": '{"X-Team": "ops"}',
        "OPENAPI_ENABLED": "false",
        "REQUEST_BODY_LIMIT": "10mb",
        "LB_URL": "ws://127.0.0.1:4102/ws",
        "ADVERTISE_URL": "http://127.0.0.1:4100",
    }
    cfg = load_text(tmp_path, GOOD, environ)
    assert cfg.auth == config.AuthSection("env-auth", "env-lb")
    assert (cfg.http.host, cfg.http.port, cfg.load_balancer.websocket_port) == ("::1", 4100, 4101)
    assert (cfg.worker.group, cfg.worker.contract) == ("gpu", 4)
    assert (cfg.worker.slots, cfg.worker.max_queue) == (5, 6)
    assert cfg.worker.default_timeout == 1.5
    assert (cfg.logging.level, cfg.logging.max_lines) == ("debug", 50)
    assert cfg.webhook.timeout == 2.5
    assert cfg.webhook.max_retries == 7
    assert cfg.webhook.retry_delay == 0.25
    assert dict(cfg.webhook.headers) == {"X-Team": "ops"}
    assert cfg.http.openapi is False
    assert cfg.http.max_body_size == 10 * 1024 * 1024
    assert cfg.load_balancer.url == "ws://127.0.0.1:4102/ws"
    assert cfg.load_balancer.advertise_url == "http://127.0.0.1:4100"


@pytest.mark.parametrize(
    ("text", "level"),
    [("warn", "warning"), ("WARN", "warning"), ("INFO", "info"), ("Debug", "debug")],
)
def test_log_level_from_the_environment_reads_like_andera(
    tmp_path: Path, text: str, level: str
) -> None:
    cfg = load_text(tmp_path, GOOD, {"LOG_LEVEL": text})
    assert cfg.logging.level == level


@pytest.mark.parametrize(
    ("text", "size"),
    [("10mb", 10485760), ("512kb", 524288), ("512KB", 524288), ("1024", 1024), ("1gb", 1 << 30)],
)
def test_request_body_limit_sizes(text: str, size: int) -> None:
    assert config.load(None, {"AUTH_KEY": "k", "REQUEST_BODY_LIMIT": text}).http.max_body_size == (
        size
    )


@pytest.mark.parametrize(("text", "value"), [("true", True), ("1", True), ("no", False)])
def test_openapi_enabled_booleans(text: str, value: bool) -> None:
    assert config.load(None, {"AUTH_KEY": "k", "OPENAPI_ENABLED": text}).http.openapi is value


def test_file_values_are_normalised_and_frozen(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        GOOD + '[webhook]\ntimeout = 2\nheaders = {X-A = "b"}\n' + '[logging]\nlevel = "warning"\n',
    )
    assert cfg.webhook.timeout == 2.0 and isinstance(cfg.webhook.timeout, float)
    assert cfg.worker.functions == ("worker.examples",)
    with pytest.raises(TypeError):
        cfg.webhook.headers["X-A"] = "c"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.worker.slots = 1  # type: ignore[misc]


def test_environment_headers_are_frozen_too() -> None:
    cfg = config.load(None, {"AUTH_KEY": "k", "WEBHOOK_HEADERS": '{"A": "b"}'})
    with pytest.raises(TypeError):
        cfg.webhook.headers["A"] = "c"  # type: ignore[index]


def test_max_body_size_in_the_file_may_be_a_size_string(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, GOOD.replace("[http]", '[http]\nmax_body_size = "512kb"'))
    assert cfg.http.max_body_size == 524288


def test_default_path_comes_from_base_worker_config(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert config.default_path({"BASE_WORKER_CONFIG": str(path)}) == path


def test_command_line_flags_beat_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, GOOD)
    clear_daemon_env(monkeypatch)
    monkeypatch.setenv("SLOTS", "7")
    monkeypatch.setenv("PORT", "4000")
    monkeypatch.setenv("LOG_LEVEL", "error")
    args = cli._parser().parse_args(
        ["--config", str(path), "--slots", "9", "--port", "4001", "--host", "::1"]
    )
    cfg, used = cli.load_config(args)
    assert used == path
    assert (cfg.worker.slots, cfg.http.port, cfg.http.host) == (9, 4001, "::1")
    assert cfg.logging.level == "error"  # no flag given: the environment still wins over the file
    cfg, _ = cli.load_config(
        cli._parser().parse_args(["--config", str(path), "--log-level", "debug"])
    )
    assert cfg.logging.level == "debug"


def test_without_config_flag_the_environment_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, GOOD)
    clear_daemon_env(monkeypatch)
    monkeypatch.setenv("BASE_WORKER_CONFIG", str(path))
    cfg, used = cli.load_config(cli._parser().parse_args([]))
    assert used == path and cfg.worker.slots == 3


# --- bad configurations --------------------------------------------------------------------------


def test_config_error_messages_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^worker\.slots must be at least 1, not 0$"):
        load_text(tmp_path, GOOD.replace("slots = 3", "slots = 0"))
    with pytest.raises(ConfigError, match=r"^worker\.slots must be an integer, not True$"):
        load_text(tmp_path, GOOD.replace("slots = 3", "slots = true"))
    with pytest.raises(ConfigError, match=r"^worker\.slots must be an integer, not 2\.5$"):
        load_text(tmp_path, GOOD.replace("slots = 3", "slots = 2.5"))


def run_worker(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        cwd=ROOT,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


BAD_FILES: list[tuple[str, str, str]] = [
    ("wrong type", GOOD.replace("slots = 3", 'slots = "ten"'), "worker.slots must be an integer"),
    ("negative slots", GOOD.replace("slots = 3", "slots = -1"), "worker.slots must be at least 1"),
    (
        "missing auth_key",
        GOOD.replace(f'auth_key = "{AUTH_KEY}"', ""),
        "auth.auth_key is required (set AUTH_KEY or [auth] auth_key)",
    ),
    (
        "empty auth_key",
        GOOD.replace(f'auth_key = "{AUTH_KEY}"', 'auth_key = ""'),
        "auth.auth_key is required",
    ),
    ("unknown section", GOOD + "[bogus]\nx = 1\n", "unknown section [bogus]"),
    ("unknown key", GOOD.replace("slots = 3", "slots = 3\nslot = 4"), "worker.slot"),
    ("invalid TOML", GOOD + "[worker\n", "is not valid TOML"),
    (
        "section not a table",
        "worker = 5\n" + GOOD.replace("[worker]", "[other]"),
        "worker must be a table",
    ),
    ("bad literal", GOOD + '[logging]\nformat = "xml"\n', "logging.format must be one of"),
    ("bad table", GOOD + "[webhook]\nheaders = {A = 1}\n", "webhook.headers must be a table"),
    ("no functions", GOOD.replace('["worker.examples"]', "[]"), "worker.functions"),
    ("bad port", GOOD.replace("\nport = 0", "\nport = 70000"), "http.port must be at most 65535"),
    (
        "bad lb url",
        GOOD.replace("websocket_port = 0", 'websocket_port = 0\nurl = "ftp://x"'),
        "load_balancer.url",
    ),
    ("nan timeout", GOOD.replace("slots = 3", "default_timeout = nan"), "worker.default_timeout"),
    ("string timeout", GOOD.replace("slots = 3", 'default_timeout = "5s"'), "default_timeout"),
]


def assert_one_line_failure(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode != 0, result
    message = result.stderr.strip()
    assert "\n" not in message, message  # one line, no traceback
    assert message.startswith("base-worker: "), message
    assert expected in message, message
    assert AUTH_KEY not in message


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_bad_config_file_exits_non_zero_naming_the_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, text)
    assert_one_line_failure(run_worker("--config", str(path)), expected)


def test_unreadable_config_files_exit_non_zero(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    expected = f"cannot read config file {missing}"
    assert_one_line_failure(run_worker("--config", str(missing)), expected)
    assert_one_line_failure(run_worker("--config", str(tmp_path)), "cannot read config file")


BAD_ENV: list[tuple[dict[str, str], str]] = [
    ({"SLOTS": "abc"}, "worker.slots (from $SLOTS)"),
    ({"SLOTS": "0"}, "worker.slots must be at least 1"),
    ({"DEFAULT_TIMEOUT": "soon"}, "worker.default_timeout (from $DEFAULT_TIMEOUT)"),
    ({"DEFAULT_TIMEOUT": "0"}, "worker.default_timeout must be at least"),
    ({"DEFAULT_TIMEOUT": "nan"}, "worker.default_timeout"),
    ({"REQUEST_BODY_LIMIT": "lots"}, "http.max_body_size (from $REQUEST_BODY_LIMIT)"),
    ({"WEBHOOK_HEADERS": "{not json"}, "webhook.headers (from $WEBHOOK_HEADERS)"),
    ({"WEBHOOK_HEADERS": "[1]"}, "webhook.headers must be a table of strings"),
    ({"OPENAPI_ENABLED": "maybe"}, "http.openapi (from $OPENAPI_ENABLED)"),
    ({"PORT": "70000"}, "http.port must be at most 65535"),
    ({"LOG_LEVEL": "loud"}, "logging.level must be one of"),
    ({"MAX_QUEUE": "-1"}, "worker.max_queue must be at least 0"),
]


@pytest.mark.parametrize(("env", "expected"), BAD_ENV, ids=[next(iter(e)) for e, _ in BAD_ENV])
def test_bad_environment_value_exits_non_zero_naming_the_key(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    path = write(tmp_path, GOOD)
    assert_one_line_failure(run_worker("--config", str(path), **env), expected)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--slots", "abc"], "worker.slots (from --slots)"),
        (["--port", "-1"], "http.port must be at least 0"),
        (["--log-level", "loud"], "logging.level must be one of"),
    ],
)
def test_bad_flag_exits_non_zero_naming_the_key(
    tmp_path: Path, flags: list[str], expected: str
) -> None:
    path = write(tmp_path, GOOD)
    assert_one_line_failure(run_worker("--config", str(path), *flags), expected)


def test_missing_auth_key_without_any_config_file(tmp_path: Path) -> None:
    result = run_worker(BASE_WORKER_CONFIG=str(tmp_path / "absent.toml"))
    assert_one_line_failure(result, "cannot read config file")
    # No file at all (and no /etc one here): defaults plus environment, which lacks the key.
    if not config.DEFAULT_PATH.exists():
        assert_one_line_failure(run_worker(), "auth.auth_key is required")


def test_env_values_do_not_leak_into_error_messages() -> None:
    parsed: dict[str, Any] = {}
    with pytest.raises(ConfigError) as caught:
        config.load(None, {"AUTH_KEY": "k", "WEBHOOK_HEADERS": '{"A": 5}'}, parsed)
    assert str(caught.value) == "webhook.headers must be a table of strings"


@pytest.mark.parametrize(
    ("line", "name"),
    [
        ("auth_key = 918273645", "auth.auth_key"),
        ("lb_auth_key = 918273645", "auth.lb_auth_key"),
    ],
)
def test_a_secret_of_the_wrong_type_is_not_repeated_in_the_error(
    tmp_path: Path, line: str, name: str
) -> None:
    path = write(tmp_path, f"[auth]\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path, {}, {})
    assert str(caught.value).startswith(f"{name} must be a string")
    assert "918273645" not in str(caught.value)


def test_a_webhook_secret_of_the_wrong_type_is_not_repeated_either(tmp_path: Path) -> None:
    path = write(tmp_path, '[auth]\nauth_key = "k"\n[webhook]\nsecret = 918273645\n')
    with pytest.raises(ConfigError) as caught:
        config.load(path, {}, {})
    assert "918273645" not in str(caught.value)
    assert str(caught.value).startswith("webhook.secret must be a string")


def test_http_edge_options_defaults_bounds_and_restart() -> None:
    cfg = make_config()
    http = cfg.http
    assert (http.header_timeout, http.body_timeout, http.keepalive_timeout) == (10.0, 30.0, 75.0)
    assert http.max_connections == 10000
    edge = {"header_timeout": 5, "body_timeout": 5, "keepalive_timeout": 0, "max_connections": 5}
    # The listener reads all but body_timeout at start; the API reads body_timeout per request.
    assert config.needs_restart(cfg, make_config(http=edge)) == [
        "http.header_timeout",
        "http.keepalive_timeout",
        "http.max_connections",
    ]
    with pytest.raises(ConfigError, match=r"http\.max_connections must be at least 1"):
        make_config(http={"max_connections": 0})
    with pytest.raises(ConfigError, match=r"http\.header_timeout must be at least"):
        make_config(http={"header_timeout": 0})
