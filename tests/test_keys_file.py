"""auth.keys_file: a TOML file of keys laid over [auth], as the Debian package writes it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_config import clean_env
from worker import config
from worker.errors import ConfigError

FILE_KEY = "file-auth-key-0123456789"
KEYS_KEY = "keys-auth-key-abcdefghij"
KEYS_LB_KEY = "keys-lb-key-klmnopqrstuv"


def write_config(tmp_path: Path, keys_file: str, auth_key: str = FILE_KEY) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[worker]\nfunctions = ["worker.examples"]\n\n'
        f'[auth]\nauth_key = "{auth_key}"\nkeys_file = "{keys_file}"\n'
    )
    return path


def write_keys(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return path


def test_keys_file_overrides_the_auth_table(tmp_path: Path) -> None:
    keys = write_keys(tmp_path, f'auth_key = "{KEYS_KEY}"\nlb_auth_key = "{KEYS_LB_KEY}"\n')
    cfg = config.load(write_config(tmp_path, str(keys)), {})
    assert (cfg.auth.auth_key, cfg.auth.lb_auth_key) == (KEYS_KEY, KEYS_LB_KEY)
    assert cfg.auth.keys_file == str(keys)
    assert {KEYS_KEY, KEYS_LB_KEY} <= cfg.secrets()


def test_a_key_the_file_leaves_out_keeps_its_auth_value(tmp_path: Path) -> None:
    write_keys(tmp_path, f'lb_auth_key = "{KEYS_LB_KEY}"\n')
    cfg = config.load(write_config(tmp_path, "keys.toml"), {})  # relative to the config file
    assert (cfg.auth.auth_key, cfg.auth.lb_auth_key) == (FILE_KEY, KEYS_LB_KEY)


def test_the_environment_still_beats_the_keys_file(tmp_path: Path) -> None:
    keys = write_keys(tmp_path, f'auth_key = "{KEYS_KEY}"\n')
    cfg = config.load(write_config(tmp_path, str(keys)), {"AUTH_KEY": "env-key-0123456789"})
    assert cfg.auth.auth_key == "env-key-0123456789"


def test_keys_file_alone_satisfies_the_required_key(tmp_path: Path) -> None:
    keys = write_keys(tmp_path, f'auth_key = "{KEYS_KEY}"\n')
    assert config.load(write_config(tmp_path, str(keys), auth_key=""), {}).auth.auth_key == KEYS_KEY


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f'auth_key = "{KEYS_KEY}"\nlb_key = "{KEYS_LB_KEY}"\n', "unknown key lb_key in "),
        (f'auth_key = "{KEYS_KEY}\n', "is not valid TOML"),
        ("auth_key = 12345678901234567\n", "auth_key in "),
        (f'[auth]\nauth_key = "{KEYS_KEY}"\n', "unknown key auth in "),
    ],
)
def test_bad_keys_file_is_one_line_without_values(tmp_path: Path, text: str, message: str) -> None:
    keys = write_keys(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        config.load(write_config(tmp_path, str(keys)), {})
    error = str(caught.value)
    assert error.startswith("auth.keys_file: ") and message in error and str(keys) in error
    assert "\n" not in error
    for value in (KEYS_KEY, KEYS_LB_KEY, FILE_KEY, "12345678901234567"):
        assert value not in error


def test_missing_keys_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^auth.keys_file: cannot read .*nowhere.toml: "):
        config.load(write_config(tmp_path, str(tmp_path / "nowhere.toml")), {})


def test_keys_file_must_be_a_string(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[auth]\nauth_key = "{FILE_KEY}"\nkeys_file = 3\n')
    with pytest.raises(ConfigError, match=r"^auth.keys_file must be a string, not 3$"):
        config.load(path, {})


def test_unreadable_keys_file_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    # A directory: unreadable as a file even for root, who reads any mode.
    (tmp_path / "keys.toml").mkdir()
    cmd = [sys.executable, "-m", "worker", "--check", "--config"]
    proc = subprocess.run(
        [*cmd, str(write_config(tmp_path, "keys.toml"))],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=clean_env(),
        timeout=30,
        check=False,
    )
    assert proc.returncode != 0
    assert proc.stderr == (
        f"base-worker: config error: auth.keys_file: cannot read {tmp_path / 'keys.toml'}: "
        "Is a directory\n"
    )
