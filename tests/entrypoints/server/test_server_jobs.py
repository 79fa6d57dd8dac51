"""The video job store: one server per output folder, statuses that only move forward, honest failures on a
full disk (no partial file left, /health degraded), finished jobs removed after their retention period, and
an output folder that is checked early and needed only by video models."""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.server import ServerSettings, create_app
from ditserve.entrypoints.server import videos as videos_module
from ditserve.entrypoints.server.thread import ServerThread
from ditserve.entrypoints.server.videos import VideoJob, VideoStore, new_video_id
from ditserve.errors import InvalidParameterError
from tests.entrypoints.server.helpers import wait_for

TINY_VIDEO = {"size": "32x32", "extra_body": {"num_frames": 5, "num_inference_steps": 1, "seed": 3}}


def job(status: str, completed_at: int | None = None) -> VideoJob:
    return VideoJob(id=new_video_id(), created_at=0, status=status, model="m", prompt="p", size="8x8",
                    seconds="1", completed_at=completed_at)


def test_a_second_server_on_the_same_folder_refuses_to_start(
        video_engine: DiffusionEngine, tmp_path: Path, serve: Callable[..., ServerThread],
        connect: Callable[..., openai.OpenAI]) -> None:
    first = serve(video_engine, tmp_path)
    try:
        api = connect(first)
        running = api.videos.create(prompt="mine", **TINY_VIDEO)
        with pytest.raises(InvalidParameterError, match="in use by another ditserve server") as error:
            create_app(video_engine, ServerSettings(served_model_name="other", output_dir=tmp_path))
        assert error.value.param == "output_dir"
        assert wait_for(api, running.id, ("completed", "failed")).status == "completed"
    finally:
        first.stop()
    VideoStore(tmp_path).close()  # the lock goes with the server that held it


def test_status_only_moves_forward(tmp_path: Path) -> None:
    store = VideoStore(tmp_path)
    try:
        interrupted = job("in_progress")
        store.insert(interrupted)
        store.fail_interrupted("server_restarted", "restarted")
        # the engine finishing the job after it was marked failed must not turn it into "completed"
        assert not store.finish(interrupted.id, "completed", progress=100)
        assert (store.get(interrupted.id).status, store.get(interrupted.id).error_code) == (
            "failed", "server_restarted")
        done = job("queued")
        store.insert(done)
        assert store.finish(done.id, "completed", progress=100)
        assert not store.finish(done.id, "failed", error_code="late", error_message="too late")
        assert store.get(done.id).status == "completed" and store.get(done.id).error_code is None
    finally:
        store.close()


def test_a_full_disk_fails_the_job_honestly_and_degrades_health(
        video_engine: DiffusionEngine, tmp_path: Path, serve: Callable[..., ServerThread],
        connect: Callable[..., openai.OpenAI], monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(path: Path, data: bytes) -> None:
        path.write_bytes(data[:100])  # part of it got there
        raise OSError(errno.ENOSPC, "No space left on device")

    server = serve(video_engine, tmp_path)
    try:
        api = connect(server)
        monkeypatch.setattr(videos_module, "write_file", full_disk)
        failed = wait_for(api, api.videos.create(prompt="too big", **TINY_VIDEO).id, ("completed", "failed"))
        assert failed.status == "failed" and failed.error.code == "storage_error"
        assert "disk of the output directory is full" in failed.error.message
        assert list((tmp_path / "videos").iterdir()) == []  # no .partial, no .mp4
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert "full" in health.json()["reason"]

        monkeypatch.undo()
        done = wait_for(api, api.videos.create(prompt="fits", **TINY_VIDEO).id, ("completed", "failed"))
        assert done.status == "completed"
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
    finally:
        server.stop()


def test_partial_files_of_a_crash_are_removed_at_start(tmp_path: Path) -> None:
    VideoStore(tmp_path).close()
    leftover = tmp_path / "videos" / f"{new_video_id()}.mp4.partial"
    leftover.write_bytes(b"half a video")
    VideoStore(tmp_path).close()
    assert not leftover.exists()


def test_finished_jobs_expire_with_their_files(
        video_engine: DiffusionEngine, tmp_path: Path, serve: Callable[..., ServerThread]) -> None:
    now = int(time.time())
    store = VideoStore(tmp_path)
    old, recent, running = job("completed", now - 7200), job("failed", now - 60), job("in_progress")
    for each in (old, recent, running):
        store.insert(each)
    store.write_video(old.id, b"old mp4")
    store.close()

    server = serve(video_engine, tmp_path, video_ttl_s=3600)  # the first sweep runs at start-up
    try:
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/v1/videos/{old.id}").status_code != 404:
            assert time.monotonic() < deadline, "the expired job was never removed"
            time.sleep(0.05)
        assert not (tmp_path / "videos" / f"{old.id}.mp4").exists()
        assert httpx.get(f"{server.url}/v1/videos/{recent.id}").status_code == 200
        # the running one belonged to a server that is gone: failed now, kept until it expires in turn
        assert httpx.get(f"{server.url}/v1/videos/{running.id}").json()["status"] == "failed"
    finally:
        server.stop()


def test_the_output_dir_is_needed_only_by_video_models(
        image_engine: DiffusionEngine, video_engine: DiffusionEngine, tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    create_app(image_engine, ServerSettings(served_model_name="tiny", output_dir=not_a_folder / "jobs"))
    with pytest.raises(InvalidParameterError, match="output_dir") as error:
        create_app(video_engine, ServerSettings(served_model_name="tiny", output_dir=not_a_folder / "jobs"))
    assert error.value.param == "output_dir"


def test_image_servers_have_no_video_jobs(image_server: ServerThread) -> None:
    assert httpx.get(image_server.url + "/v1/videos").json()["data"] == []
    missing = httpx.get(f"{image_server.url}/v1/videos/{new_video_id()}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "video_not_found"


def test_an_unusable_output_dir_fails_before_the_model_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from ditserve.engine import engine as engine_module
    from ditserve.entrypoints.cli import main

    def no_loading(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(engine_module, "DiffusionEngine", no_loading)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    assert main(["serve", "--output-dir", str(not_a_folder)]) == 2
    assert "output_dir" in capsys.readouterr().err
