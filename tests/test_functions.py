"""Declaring functions and tags; loading them from modules, files and directories; their forms."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AUTH, task
from worker import functions
from worker.functions import LoadError

Start = Callable[..., Any]

ONE = """
from worker import function, tag

@function(params={"n": {"type": "number", "default": 1}}, timeout=2.5, max_retries=1)
async def double(params, ctx):
    return params["n"] * 2

@tag("one-version")
def version():
    return "1.0"
"""

TWO = """
from worker import function

@function
def shout(params, ctx):
    return "HEY"

@function(name="renamed", streaming=True)
async def pieces(params, ctx):
    yield "a"
    yield "b"
"""


def source(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def test_load_from_a_module_name() -> None:
    registry = functions.load(["worker.examples"])
    assert list(registry.functions) == ["hello"]
    hello = registry.functions["hello"]
    assert (hello.kind, hello.streaming, hello.timeout) == ("async", True, 5.0)
    assert "python" in registry.tags


def test_load_from_a_file(tmp_path: Path) -> None:
    registry = functions.load([str(source(tmp_path, "one.py", ONE))])
    spec = registry.functions["double"]
    assert (spec.kind, spec.timeout, spec.max_retries, spec.streaming) == ("async", 2.5, 1, False)
    assert spec.describe() == {"name": "double", "params": {"n": {"type": "number", "default": 1}}}
    assert list(registry.tags) == ["one-version"]


def test_load_from_a_directory_skips_private_and_other_files(tmp_path: Path) -> None:
    source(tmp_path, "one.py", ONE)
    source(tmp_path, "two.py", TWO)
    source(tmp_path, "_helpers.py", "raise RuntimeError('private modules are not loaded')")
    source(tmp_path, "notes.txt", "not python")
    registry = functions.load([str(tmp_path)])
    assert sorted(registry.functions) == ["double", "renamed", "shout"]
    kinds = {name: spec.kind for name, spec in registry.functions.items()}
    assert kinds == {"double": "async", "shout": "thread", "renamed": "generator"}
    assert registry.functions["renamed"].streaming is True


def test_load_from_several_sources(tmp_path: Path) -> None:
    registry = functions.load(["worker.examples", str(source(tmp_path, "two.py", TWO))])
    assert sorted(registry.functions) == ["hello", "renamed", "shout"]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: str(d / "missing.py"), "missing.py does not exist"),
        (lambda d: str(d / "no" / "such-dir"), "such-dir does not exist"),
        (
            lambda d: "no_such_module_for_base_worker",
            "cannot import no_such_module_for_base_worker",
        ),
        (
            lambda d: str(source(d, "broken.py", "import no_such_dependency_xyz\n")),
            "ModuleNotFoundError",
        ),
        (lambda d: str(source(d, "syntax.py", "def (:\n")), "SyntaxError"),
        (lambda d: str(source(d, "raises.py", "raise ValueError('boom at import')\n")), "boom"),
        (lambda d: str(source(d, "empty.py", "x = 1\n")), "no functions found"),
        (
            lambda d: str(
                source(
                    d,
                    "badparams.py",
                    "from worker import function\n"
                    "@function(params={'x': {'type': 'str'}})\n"
                    "async def f(params, ctx): pass\n",
                )
            ),
            "param 'x': type must be one of",
        ),
        (
            lambda d: str(
                source(
                    d,
                    "badkey.py",
                    "from worker import function\n"
                    "@function(params={'x': {'type': 'string', 'minLength': 1}})\n"
                    "async def f(params, ctx): pass\n",
                )
            ),
            "unknown key(s) minLength",
        ),
        (
            lambda d: str(
                source(
                    d,
                    "badtimeout.py",
                    "from worker import function\n"
                    "@function(timeout=0)\n"
                    "async def f(params, ctx): pass\n",
                )
            ),
            "timeout must be positive",
        ),
    ],
    ids=[
        "missing file",
        "missing directory",
        "missing module",
        "import fails",
        "syntax error",
        "raises at import",
        "no functions",
        "bad param type",
        "unknown param key",
        "bad timeout",
    ],
)
def test_load_problems_are_one_line_load_errors(
    tmp_path: Path, make: Callable[[Path], str], expected: str
) -> None:
    with pytest.raises(LoadError) as caught:
        functions.load([make(tmp_path)])
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_two_functions_with_one_name_is_an_error(tmp_path: Path) -> None:
    first = source(tmp_path, "a.py", "from worker import function\n@function\ndef same(p, c): 1\n")
    second = source(tmp_path, "b.py", "from worker import function\n@function\ndef same(p, c): 2\n")
    with pytest.raises(LoadError, match="function 'same' is defined twice"):
        functions.load([str(first), str(second)])
    with pytest.raises(LoadError, match="function 'same' is defined twice"):
        functions.load([str(tmp_path)])


def test_a_name_override_can_collide_too(tmp_path: Path) -> None:
    text = (
        "from worker import function\n"
        "@function\nasync def greet(p, c): 1\n"
        "@function(name='greet')\nasync def other(p, c): 2\n"
    )
    with pytest.raises(LoadError, match="'greet' is defined twice"):
        functions.load([str(source(tmp_path, "dup.py", text))])


def test_a_file_cannot_shadow_a_module_function(tmp_path: Path) -> None:
    text = "from worker import function\n@function\nasync def hello(p, c): 1\n"
    with pytest.raises(LoadError, match="'hello' is defined twice"):
        functions.load(["worker.examples", str(source(tmp_path, "hello.py", text))])


async def test_tags_compute_each_time_and_show_errors(tmp_path: Path) -> None:
    text = """
    from worker import function, tag
    COUNT = [0]

    @function
    async def noop(params, ctx):
        return None

    @tag("counter")
    async def counter():
        COUNT[0] += 1
        return COUNT[0]

    @tag("broken")
    def broken():
        raise RuntimeError("sensor offline")
    """
    registry = functions.load([str(source(tmp_path, "tags.py", text))])
    assert await registry.compute_tags() == {"counter": 1, "broken": "error: sensor offline"}
    assert (await registry.compute_tags())["counter"] == 2


# --- the three forms, over HTTP ------------------------------------------------------------------


async def call(client: Any, function: str, **fields: Any) -> Any:
    response = await client.post("/task", json=task(function, **fields), headers=AUTH)
    assert response.status == 200, await response.text()
    return (await response.json())["result"]


async def test_async_def_runs_on_the_event_loop(worker_app: Start) -> None:
    client, _ = await worker_app()
    assert await call(client, "loop_thread_name") == "MainThread"


async def test_plain_def_runs_in_a_worker_thread(worker_app: Start) -> None:
    client, _ = await worker_app()
    name = await call(client, "thread_name")
    assert name != "MainThread" and name.startswith("function")


async def test_generator_strings_are_joined(worker_app: Start) -> None:
    client, _ = await worker_app()
    assert await call(client, "chunks", input={"count": 3}) == "chunk0 chunk1 chunk2 "


async def test_generator_of_other_values_is_a_list(worker_app: Start) -> None:
    client, _ = await worker_app()
    assert await call(client, "numbers") == [1, 2, 3]


async def test_functions_from_a_directory_serve_and_tag(worker_app: Start, tmp_path: Path) -> None:
    source(tmp_path, "one.py", ONE)
    source(tmp_path, "two.py", TWO)
    client, _ = await worker_app(worker={"functions": [str(tmp_path)]})
    assert await call(client, "double", input={"n": 21}) == 42
    assert await call(client, "shout") == "HEY"
    assert await call(client, "renamed") == "ab"
    health = await (await client.get("/health", headers=AUTH)).json()
    assert health["tags"] == {"one-version": "1.0"}
    assert sorted(f["name"] for f in health["functions"]) == ["double", "renamed", "shout"]
