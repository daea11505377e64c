"""Issue 14's low items on avatars: names matched in full, an atomic delete, a bounded renderer cache and
a bounded number of stored avatars."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from skimage import data
from websockets.asyncio.client import connect

from avatarchat.config import load_settings
from avatarchat.engines.avatar.library import AvatarLibrary
from avatarchat.services.avatar_store import AvatarStore, AvatarStoreError
from tests.support.live_app import LiveApp
from tests.test_avatar_api import png, upload
from tests.test_server import open_client


@pytest.fixture(scope="module")
def astronaut_png() -> bytes:
    return png(data.astronaut())


def store_at(path: Path, **kwargs: int) -> AvatarStore:
    return AvatarStore(path, max_upload_bytes=10 << 20, max_pixels=40_000_000, **kwargs)


# -- 1. names -------------------------------------------------------------------------------------


def test_a_name_with_a_trailing_newline_is_refused(live_app: LiveApp, astronaut_png: bytes, tmp_path: Path) -> None:
    """`re.match` with `$` let "abc\\n" through (`$` also matches before a final newline)."""
    store = store_at(tmp_path)
    with pytest.raises(AvatarStoreError, match="avatar names") as e:
        store.add("abc\n", astronaut_png)
    assert e.value.status == 400 and [a.name for a in store.list()] == ["default"]
    store.close()
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no directory "abc\n" either

    r = upload(live_app, "abc\n", astronaut_png)
    assert r.status_code == 400 and "avatar names" in r.json()["detail"], r.text
    for name in ("default\n", "abc\n"):
        r = httpx.get(live_app.http + "/api/avatar/preview", params={"name": name})
        assert r.status_code == 400 and "avatar names" in r.json()["detail"], r.text
    assert httpx.post(live_app.http + "/api/avatar/delete", json={"name": "default\n"}).status_code == 400
    assert [a["name"] for a in httpx.get(live_app.http + "/api/avatar/list").json()["avatars"]] == ["default"]
    # The other ids checked by pattern are matched in full too.
    task = httpx.get(live_app.http + "/api/llm/tasks/" + "0" * 36 + "%0A")
    assert task.status_code == 400 and "not a task id" in task.json()["detail"], task.text
    library = AvatarLibrary(tmp_path, 25)
    assert "default\n" not in library.names()
    with pytest.raises(KeyError):
        library.renderer("default\n")


async def test_the_session_socket_checks_avatar_names_in_full(live_app: LiveApp) -> None:
    c = await open_client(live_app)
    try:
        await c.send(type="session.update", avatar="default\n")
        e = await c.event()
        assert e["type"] == "error" and e["code"] == "invalid_field" and "avatar names" in e["message"], e
        assert e["fatal"] is False
        await c.send(type="ping", id=1)
        assert await c.event() == {"type": "pong", "id": 1}
    finally:
        await c.ws.close()
    async with connect(live_app.ws + "?avatar=default%0A") as ws:
        e = json.loads(await ws.recv())
        assert e["type"] == "error" and e["code"] == "invalid_field" and "avatar names" in e["message"], e
        assert e["fatal"] is True


# -- 2. an atomic delete ------------------------------------------------------------------------------


@contextlib.contextmanager
def unwritable(directory: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """No entry of ``directory`` can be created, renamed or removed any more. For real where possible: chmod for a
    normal user; as root, whom chmod does not stop, the immutable attribute (chattr +i). Only where neither works,
    ``os.rename`` out of that directory raises PermissionError (what a read-only directory does). Yields which."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        how, undo = "chmod 555", lambda: directory.chmod(0o755)
    elif subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0:
        how, undo = "chattr +i", lambda: subprocess.run(["chattr", "-i", str(directory)], check=True)
    else:
        real_rename = os.rename

        def rename(src: object, dst: object, *args: object, **kwargs: object) -> None:
            if Path(str(src)).parent == directory:
                raise PermissionError(13, "Permission denied", str(src))
            real_rename(src, dst, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "rename", rename)
        how, undo = "os.rename patched", monkeypatch.undo
    try:
        if how != "os.rename patched":
            with pytest.raises(PermissionError):
                (directory / "probe").mkdir()
        yield how
    finally:
        undo()


def test_a_delete_that_cannot_remove_the_files_keeps_the_avatar_whole(tmp_path: Path, astronaut_png: bytes,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_at(tmp_path)
    store.add("astro", astronaut_png)
    with unwritable(tmp_path, monkeypatch) as how:
        with pytest.raises(AvatarStoreError, match="could not delete") as e:
            store.delete("astro")
        assert e.value.status == 500, how
        # Nothing happened: the row, the files and a fresh view of the store all still have it.
        assert store.exists("astro") and [a.name for a in store.list()] == ["default", "astro"]
        assert (tmp_path / "astro" / "portrait.png").is_file()
        assert store.load("astro").image.shape == (512, 512, 3)
    store.close()
    store = store_at(tmp_path)  # reopening (reconcile) keeps it too
    assert [a.name for a in store.list()] == ["default", "astro"]
    store.delete("astro")  # writable again: it goes, all of it
    assert [a.name for a in store.list()] == ["default"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []
    store.close()


# -- 7. bounds: cached renderers and stored avatars ----------------------------------------------------


def test_the_renderer_cache_is_bounded_and_keeps_avatars_in_use(tmp_path: Path, astronaut_png: bytes) -> None:
    store = store_at(tmp_path)
    for name in ("a1", "a2", "a3"):
        store.add(name, astronaut_png)
    store.close()
    in_use: set[str] = {"a1"}
    library = AvatarLibrary(tmp_path, 25, max_renderers=2)
    library.in_use = lambda: in_use
    held = library.renderer("a1")
    for name in ("a2", "a3", "default", "a2"):
        library.renderer(name)
        assert len(library.cached()) <= 2 and "a1" in library.cached(), (name, library.cached())
    assert library.renderer("a1") is held  # never rebuilt while in use
    assert library.cached() == ["a2", "a1"]  # least recently used first
    in_use.clear()
    library.renderer("a3")
    assert library.cached() == ["a1", "a3"]  # a1, no longer used, is the next to go...
    library.renderer("default")
    assert library.cached() == ["a3", "default"]  # ...and goes
    in_use.update({"a1", "a2", "a3"})  # more avatars in use than the bound: none of them is dropped
    for name in ("a1", "a2"):
        library.renderer(name)
    assert sorted(library.cached()) == ["a1", "a2", "a3"]


@pytest.fixture(scope="module")
def bounded_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    """An avatar service (renderer only, no LLM or ASR) with small bounds."""
    settings = load_settings(services={"role": "avatar"}, avatar={"dir": str(tmp_path_factory.mktemp("bounded")),
                                                                  "max_avatars": 3, "max_cached_renderers": 2})
    app = LiveApp(settings).start()
    yield app
    app.stop()


def test_uploads_beyond_max_avatars_are_refused_and_store_nothing(bounded_app: LiveApp, astronaut_png: bytes) -> None:
    for name in ("one", "two", "three"):
        assert upload(bounded_app, name, astronaut_png).status_code == 201
    r = upload(bounded_app, "four", astronaut_png)
    assert r.status_code == 409 and "limit of 3 avatars" in r.json()["detail"], r.text
    listed = [a["name"] for a in httpx.get(bounded_app.http + "/api/avatar/list").json()["avatars"]]
    assert listed == ["default", "one", "two", "three"]
    assert sorted(p.name for p in Path(bounded_app.settings.avatar.dir).iterdir() if p.is_dir()) == ["one", "three", "two"]
    # Deleting one makes room again.
    assert httpx.post(bounded_app.http + "/api/avatar/delete", json={"name": "three"}).status_code == 200
    assert upload(bounded_app, "four", astronaut_png).status_code == 201


def test_previews_leave_the_renderer_cache_bounded(bounded_app: LiveApp, astronaut_png: bytes) -> None:
    http = bounded_app.http
    for name in ("one", "two", "four"):
        if upload(bounded_app, name, astronaut_png).status_code not in (201, 409):
            pytest.fail(f"could not upload {name}")
    library = bounded_app.app.state.engines.avatars
    # A gateway's render stream uses "one": previews of the others never evict it.
    opened = httpx.post(http + "/api/render/open", json={"avatar": "one", "audio_rate": 22050}, timeout=60)
    assert opened.status_code == 201, opened.text
    try:
        held = library.renderer("one")
        for name in ("two", "four", "two", "four", "default"):
            r = httpx.get(http + "/api/avatar/preview", params={"name": name, "size": 64}, timeout=60)
            assert r.status_code == 200, r.text
            # The default avatar (every new session's) and the one in use are kept; the rest share the bound.
            assert len(library.cached()) <= 3 and "one" in library.cached(), library.cached()
        assert library.renderer("one") is held
    finally:
        assert httpx.delete(http + f"/api/render/{opened.json()['id']}").status_code == 200
    for name in ("two", "four"):
        assert httpx.get(http + "/api/avatar/preview", params={"name": name, "size": 64}, timeout=60).status_code == 200
    assert len(library.cached()) <= 2 and "one" not in library.cached(), library.cached()


async def test_a_session_keeps_its_avatar_cached(live_app: LiveApp) -> None:
    library = live_app.app.state.engines.avatars
    assert live_app.settings.avatar.default in library.in_use()
    c = await open_client(live_app)
    try:
        assert library.in_use().count("default") >= 2  # the configured default, and this session's
    finally:
        await c.ws.close()
