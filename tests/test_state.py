"""A restart of the provider loses no deployed function or secret."""

from __future__ import annotations

import json
import os
import stat
from typing import Any

import pytest

from faas_provider.api.app import create_app
from faas_provider.backends.local import state
from faas_provider.backends.local.backend import LocalBackend
from faas_provider.backends.local.state import StateDirInUse
from faas_provider.settings import Settings
from tests.conftest import ECHO, faas_cli_deploy, wait_available


async def test_functions_replicas_and_secrets_survive_a_restart(
    aiohttp_client: Any, settings: Settings
) -> None:
    def provider() -> Any:
        backend = LocalBackend(settings.local.state_dir, settings.local.functions_dir)
        return aiohttp_client(create_app(backend, settings))

    first = await provider()
    await first.post("/system/secrets", json={"name": "token", "value": "t0k"})
    assert await faas_cli_deploy(first, {**ECHO, "secrets": ["token"]}) == 202
    await first.post("/system/scale-function/echo", json={"replicas": 2})
    await wait_available(first, "echo", 2)
    created = (await (await first.get("/system/function/echo")).json())["createdAt"]
    await first.close()  # stops the server, the backend and every replica

    secrets_file = settings.local.state_dir / "secrets.json"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    assert json.loads(secrets_file.read_text())[0]["name"] == "token"

    second = await provider()
    status = await wait_available(second, "echo", 2)
    assert status["replicas"] == 2
    assert status["createdAt"] == created
    assert status["secrets"] == ["token"]
    assert await (await second.get("/system/secrets")).json() == [
        {"name": "token", "namespace": "openfaas-fn"}
    ]
    answer = await second.post("/function/echo", data=b"still here")
    assert await answer.text() == "still here"


async def test_a_save_that_fails_midway_leaves_the_previous_file_whole(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = LocalBackend(settings.local.state_dir, settings.local.functions_dir)
    await backend.start()
    try:
        await backend.create_namespace("team-a", {}, {})
        before = (settings.local.state_dir / "functions.json").read_text()

        def dump_half_then_fail(document: object, handle: Any, **_: Any) -> None:
            handle.write(json.dumps(document)[:10])
            raise OSError("disk full")

        monkeypatch.setattr(state.json, "dump", dump_half_then_fail)
        with pytest.raises(OSError, match="disk full"):
            await backend.create_namespace("team-b", {}, {})
        assert (settings.local.state_dir / "functions.json").read_text() == before
        assert sorted(p.name for p in settings.local.state_dir.iterdir() if p.is_file()) == [
            "functions.json",
            "lock",
            "secrets.json",
        ], "no temporary file may be left behind"
    finally:
        await backend.close()


async def test_two_providers_cannot_share_a_state_directory(settings: Settings) -> None:
    first = LocalBackend(settings.local.state_dir, settings.local.functions_dir)
    await first.start()
    second = LocalBackend(settings.local.state_dir, settings.local.functions_dir)
    try:
        with pytest.raises(StateDirInUse, match=f"pid {os.getpid()}"):
            await second.start()
    finally:
        await first.close()
    await second.start()  # free again once the first has stopped
    await second.close()


async def test_a_stored_function_that_no_longer_loads_is_left_out_and_kept(
    aiohttp_client: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings.local.state_dir.mkdir(parents=True)
    broken = {  # an environment no process can have: refused today, stored by an older version
        "deployment": {"service": "old", "image": "x/old:1", "envVars": {"A=B": "1"}},
        "replicas": 1,
        "createdAt": "2026-01-01T00:00:00Z",
    }
    document = {"functions": [broken], "namespaces": {"openfaas-fn": {}}}
    (settings.local.state_dir / "functions.json").write_text(json.dumps(document))
    backend = LocalBackend(settings.local.state_dir, settings.local.functions_dir)
    client = await aiohttp_client(create_app(backend, settings))
    assert "stored function old.openfaas-fn cannot be loaded" in caplog.text
    assert await faas_cli_deploy(client, ECHO) == 202, "the others deploy and run as usual"
    await wait_available(client, "echo")
    listed = {f["name"] for f in await (await client.get("/system/functions")).json()}
    assert listed == {"echo"}
    stored = json.loads((settings.local.state_dir / "functions.json").read_text())["functions"]
    assert broken in stored, "the entry is written back as it was, not lost"
    fixed = {"service": "old", "image": "x/old:1", "envProcess": "cat"}
    assert await faas_cli_deploy(client, fixed) == 202
    stored = json.loads((settings.local.state_dir / "functions.json").read_text())["functions"]
    assert broken not in stored, "a function deployed under its name replaces it"
    assert sorted(entry["deployment"]["service"] for entry in stored) == ["echo", "old"]
