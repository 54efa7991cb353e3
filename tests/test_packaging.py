"""What the packages carry, checked without building a .deb: version, man page, wheel.

The .deb itself is built and installed under systemd in tests/systemd/test_package.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT
from tests.test_config import clean_env
from worker import __version__, cli, config

NOT_COPIED = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "bench")
DATA_FILES = (
    "share/base-worker/config.example.toml",
    "share/base-worker/systemd/base-worker.service",
    "share/base-worker/systemd/base-worker.socket",
    "share/base-worker/systemd/base-worker@.service",
    "share/base-worker/systemd/base-worker.sysusers",
)


def test_debian_changelog_version_is_the_program_version() -> None:
    first = (ROOT / "packaging/debian/changelog").read_text().splitlines()[0]
    match = re.match(r"^base-worker \((?P<upstream>.+)-(?P<revision>[^-]+)\) ", first)
    assert match, first
    assert match["upstream"] == __version__


def test_every_lintian_override_gives_its_reason() -> None:
    lines = (ROOT / "packaging/debian/base-worker.lintian-overrides").read_text().splitlines()
    for before, line in zip(["", *lines], lines, strict=False):
        if line.strip() and not line.startswith("#"):
            assert before.startswith("#"), f"no reason above: {line}"


def manpage() -> ModuleType:
    # By path: a top-level `packaging` would be the PyPI library of that name.
    spec = importlib.util.spec_from_file_location("manpage", ROOT / "packaging/manpage.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plain(roff: str) -> str:
    """The page as a reader sees it, near enough: font changes and escapes removed."""
    for code, text in (("\\fB", ""), ("\\fR", ""), ("\\fI", ""), ("\\&", ""), ("\\-", "-")):
        roff = roff.replace(code, text)
    return roff.replace("\\e", "\\")


def every_command(
    parser: argparse.ArgumentParser, path: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """The parser, then every subcommand under it, named like "ctl status"."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from every_command(sub, f"{path} {name}".strip())


def assert_covers(page: str, parser: argparse.ArgumentParser) -> None:
    text = plain(page)
    for name, command in every_command(parser):
        if name:
            assert f'.SS "{name}"' in text, f"subcommand {name!r} is not in the man page"
        for action in command._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue
            for option in action.option_strings:
                assert re.search(rf"(^|[ ,]){re.escape(option)}\b", text, re.MULTILINE), (
                    f"{name or 'base-worker'} {option} is not in the man page"
                )


def test_man_page_mentions_every_option_and_subcommand() -> None:
    parser = cli._parser()
    page = manpage().page(parser, "2026-01-01")
    assert_covers(page, parser)
    for opt in config.options():
        if opt.meta["env"]:
            assert opt.meta["env"] in plain(page)


def test_man_page_covers_subcommands_a_parser_gains() -> None:
    """The check walks the parser: a subcommand added later is covered, and a missed one fails."""
    parser = argparse.ArgumentParser(prog="base-worker", description="a worker")
    parser.add_argument("--config", help="TOML config file")
    subs = parser.add_subparsers(dest="command")
    later = subs.add_parser("later", description="a command added later")
    later.add_argument("--url", help="the worker's address")
    later.add_subparsers().add_parser("status").add_argument("--json", action="store_true")
    page = manpage().page(parser, "2026-01-01")
    assert_covers(page, parser)
    with pytest.raises(AssertionError, match="later status --json"):
        assert_covers(page.replace("\\-\\-json", "json"), parser)


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_man_page_renders_without_groff_warnings(tmp_path: Path) -> None:
    page = tmp_path / "base-worker.1"
    page.write_text(manpage().page(cli._parser(), "2026-01-01"))
    cmd = ["groff", "-man", "-ww", "-z", "-Tutf8", str(page)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert (proc.returncode, proc.stderr) == (0, "")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a copy of the tree (an in-tree build leaves build/)."""
    tree = tmp_path_factory.mktemp("src") / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*NOT_COPIED))
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(tree)]
    subprocess.run(cmd, check=True, timeout=300, capture_output=True)
    (found,) = out.glob("base_worker-*.whl")
    return found


def test_wheel_carries_units_sysusers_and_example_config(wheel: Path) -> None:
    assert wheel.name.startswith(f"base_worker-{__version__}-")
    data = f"base_worker-{__version__}.data/data/"
    names = zipfile.ZipFile(wheel).namelist()
    for path in DATA_FILES:
        assert data + path in names
    assert f"base_worker-{__version__}.dist-info/licenses/LICENSE" in names


@pytest.mark.timeout(300)
def test_wheel_in_a_fresh_venv_runs_version_and_check(wheel: Path, tmp_path: Path) -> None:
    """What `pipx install` does: a venv of its own, the wheel and its dependencies in it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "--quiet", str(wheel)]
    subprocess.run(pip, check=True, timeout=300, capture_output=True)
    for path in DATA_FILES:
        assert (venv / path).is_file(), path

    def run(*args: str) -> str:
        proc = subprocess.run(
            [str(venv / "bin/base-worker"), *args],
            capture_output=True,
            text=True,
            env=clean_env(),
            cwd=tmp_path,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert run("--version") == f"base-worker {__version__}\n"
    example = venv / "share/base-worker/config.example.toml"
    assert run("--check", "--config", str(example)).split() == ["hello"]
