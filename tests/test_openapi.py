"""GET /openapi and GET /docs: a valid OpenAPI 3 document, and Swagger UI rendered by Chromium."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from tests.conftest import Worker

StartWorker = Callable[..., Awaitable[Worker]]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


async def document(client: Any) -> dict[str, Any]:
    async with client.get("/openapi") as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def test_the_document_is_valid_openapi_3_with_each_function_input(
    worker_app: StartWorker,
) -> None:
    client, runtime = await worker_app()
    doc = await document(client)
    validate(doc)
    assert doc["openapi"] == "3.0.2"
    schemas = doc["components"]["schemas"]
    assert schemas["helloInput"]["properties"]["name"] == {"type": "string", "default": "World"}
    assert schemas["helloInput"]["additionalProperties"] is False
    assert schemas["typedInput"]["required"] == ["text"]
    assert schemas["typedInput"]["properties"]["count"]["type"] == "number"
    envelope = schemas["TaskEnvelope"]
    assert set(envelope["required"]) == {"function", "contract"}
    assert envelope["properties"]["mode"]["enum"] == ["sync", "stream", "webhook"]
    post_task = doc["paths"]["/task"]["post"]
    variants = post_task["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    inputs = {v["title"]: v["allOf"][1]["properties"]["input"]["$ref"] for v in variants}
    assert set(inputs) == set(runtime.registry.functions)
    assert inputs["hello"] == "#/components/schemas/helloInput"
    assert {"200", "202", "400", "401", "404", "413", "500", "503", "504"} <= set(
        post_task["responses"]
    )
    schemes = doc["components"]["securitySchemes"]
    assert schemes["authKey"]["name"] == "Authorization"
    assert schemes["lbAuthKey"]["name"] == "x-lb-auth"
    assert doc["paths"]["/logs"]["get"]["security"] == [{"authKey": []}, {"lbAuthKey": []}]


async def test_every_route_is_documented(worker_app: StartWorker) -> None:
    client, _ = await worker_app()
    paths = (await document(client))["paths"]
    for route in client.server.app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        # Not routes of the API: Swagger UI's files, and the JSON 404/405 for everything else.
        if route.method == "HEAD" or path in ("/docs/static/{name}", "/{path}"):
            continue
        assert route.method.lower() in paths.get(path, {}), f"{route.method} {path}"


async def test_disabled_openapi_answers_404(worker_app: StartWorker) -> None:
    client, _ = await worker_app(http={"openapi": False})
    for path in ("/openapi", "/docs", "/docs/static/swagger-ui.css"):
        async with client.get(path) as resp:
            assert resp.status == 404, path


async def test_docs_use_only_local_assets(worker_app: StartWorker) -> None:
    client, _ = await worker_app()
    async with client.get("/docs") as resp:
        assert resp.status == 200
        html = await resp.text()
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets
    for asset in assets:
        assert asset.startswith("/docs/static/"), asset
        async with client.get(asset) as resp:
            assert resp.status == 200, asset
    assert '"/openapi"' in html


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/system-deps)")
async def test_docs_render_the_post_task_operation_in_chromium(
    worker_app: StartWorker, tmp_path: Path
) -> None:
    assert CHROMIUM is not None
    client, _ = await worker_app()
    url = str(client.make_url("/docs"))
    screenshot = tmp_path / "docs.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--window-size=1280,1600",
    ]

    async def chromium(*extra: str) -> str:
        process = await asyncio.create_subprocess_exec(
            CHROMIUM,
            *flags,
            *extra,
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(40):
                out, err = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode == 0, err.decode(errors="replace")[-2000:]
        return out.decode(errors="replace")

    dom = await chromium("--dump-dom")
    text = re.sub(r"<[^>]+>", " ", dom)
    assert re.search(r"POST\s+/task", text), text[:2000]
    assert "Run a function" in text
    assert re.search(r"GET\s+/logs", text)
    await chromium(f"--screenshot={screenshot}")
    assert screenshot.stat().st_size > 10_000
