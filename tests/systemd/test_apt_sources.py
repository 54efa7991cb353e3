"""The container's Debian mirror comes from this machine's apt sources, in either format."""

from __future__ import annotations

from pathlib import Path

from .nspawn import debian_mirror

DEB822 = """\
Types: deb-src
URIs: http://src.example.org/debian
Suites: bookworm

Types: deb
# a comment line
URIs: http://security.example.org/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: http://disabled.example.org/debian
Suites: bookworm
Enabled: no

Types: deb
URIs: http://mirror.example.org/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def apt_dir(tmp_path: Path, sources_list: str = "", **files: str) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    if sources_list:
        (tmp_path / "sources.list").write_text(sources_list)
    for name, text in files.items():
        (tmp_path / "sources.list.d" / name.replace("_", ".")).write_text(text)
    return tmp_path


def test_deb822_sources_skip_other_types_suites_and_disabled_entries(tmp_path: Path) -> None:
    apt = apt_dir(tmp_path, debian_sources=DEB822)
    assert debian_mirror(apt) == "http://mirror.example.org/debian"


def test_one_line_list_with_options(tmp_path: Path) -> None:
    text = (
        "# deb http://commented.example.org/debian bookworm main\n"
        "deb-src http://src.example.org/debian bookworm main\n"
        "deb http://security.example.org/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/debian.gpg] http://list.example.org/debian"
        " bookworm main contrib\n"
    )
    assert debian_mirror(apt_dir(tmp_path, text)) == "http://list.example.org/debian"


def test_list_files_in_the_directory_count_too(tmp_path: Path) -> None:
    apt = apt_dir(tmp_path, mirror_list="deb http://dir.example.org/debian bookworm main\n")
    assert debian_mirror(apt) == "http://dir.example.org/debian"


def test_no_bookworm_source_is_none(tmp_path: Path) -> None:
    apt = apt_dir(tmp_path, "deb http://old.example.org/debian bullseye main\n")
    assert debian_mirror(apt) is None
