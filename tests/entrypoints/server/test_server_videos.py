"""Asynchronous video jobs through the official ``openai`` client, and their survival across a restart."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import httpx
import openai
import pytest

from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.server.thread import ServerThread
from ditserve.entrypoints.server.videos import VideoJob, VideoStore, new_video_id
from tests.entrypoints.server.helpers import wait_for

TINY_VIDEO = {"size": "32x32", "extra_body": {"num_frames": 5, "num_inference_steps": 2, "seed": 3}}


def frames_of(mp4: bytes) -> list[Any]:
    with av.open(io.BytesIO(mp4)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_video_job_lifecycle(video_server: ServerThread, connect: Callable[..., openai.OpenAI]) -> None:
    api = connect(video_server)
    job = api.videos.create(prompt="a ball rolls", **TINY_VIDEO)
    assert job.status in ("queued", "in_progress") and job.id.startswith("video_")
    done = wait_for(api, job.id, ("completed", "failed"))
    assert done.status == "completed", done.error
    assert done.progress == 100 and done.size == "32x32"
    assert done.model_extra["inference_time_s"] > 0 and done.model_extra["seed"] == 3
    assert "cache_stats" in done.model_extra and done.model_extra["timings"]["denoise_s"] > 0
    mp4 = api.videos.download_content(job.id).read()
    frames = frames_of(mp4)
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)

    same = wait_for(api, api.videos.create(prompt="a ball rolls", **TINY_VIDEO).id, ("completed",))
    assert api.videos.download_content(same.id).read() == mp4

    listed = [v.id for v in api.videos.list(limit=100)]
    assert job.id in listed and same.id in listed
    assert api.videos.delete(same.id).deleted
    with pytest.raises(openai.NotFoundError):
        api.videos.retrieve(same.id)
    with pytest.raises(openai.NotFoundError):
        api.videos.download_content(same.id)


def test_video_json_body_with_seconds(video_server: ServerThread, connect: Callable[..., openai.OpenAI]) -> None:
    body = {"prompt": "waves", "seconds": 1, "fps": 4, "size": "32x32", "num_inference_steps": 1}
    created = httpx.post(f"{video_server.url}/v1/videos", json=body).json()
    assert created["num_frames"] == 5 and created["fps"] == 4  # 1 s at 4 fps, plus the first frame
    assert wait_for(connect(video_server), created["id"], ("completed",)).seconds == "1"  # whole seconds
    too_long = httpx.post(f"{video_server.url}/v1/videos", json={**body, "seconds": 60})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "num_frames"
    both = httpx.post(f"{video_server.url}/v1/videos", json={**body, "num_frames": 5})
    assert both.status_code == 400 and both.json()["error"]["param"] == "seconds"


def test_running_job_reports_progress_and_stops_when_deleted(video_server: ServerThread,
                                                             connect: Callable[..., openai.OpenAI]) -> None:
    api = connect(video_server)
    job = api.videos.create(prompt="slow", size="32x32", extra_body={"num_frames": 5, "num_inference_steps": 400})
    running = wait_for(api, job.id, ("in_progress",))
    assert 0 <= running.progress < 100
    unfinished = httpx.get(f"{video_server.url}/v1/videos/{job.id}/content")
    assert unfinished.status_code == 409 and unfinished.json()["error"]["code"] == "video_not_ready"
    assert api.videos.delete(job.id).deleted
    time.sleep(0.5)
    assert video_server.app.state.server.engine.queue_depth() == 0
    with pytest.raises(openai.NotFoundError):
        api.videos.retrieve(job.id)


def test_listing_pages_in_order(video_server: ServerThread, connect: Callable[..., openai.OpenAI]) -> None:
    api = connect(video_server)
    ids = [api.videos.create(prompt=f"clip {i}", size="32x32",
                             extra_body={"num_frames": 1, "num_inference_steps": 1}).id for i in range(3)]
    page = api.videos.list(limit=2, order="asc", after=ids[0])
    assert [v.id for v in page.data] == ids[1:]
    newest = api.videos.list(limit=1, order="desc")
    assert newest.data[0].id == ids[-1] and newest.has_more


def test_finished_jobs_survive_a_restart_and_running_ones_fail(
        video_engine: DiffusionEngine, tmp_path: Path, serve: Callable[..., ServerThread],
        connect: Callable[..., openai.OpenAI]) -> None:
    first = serve(video_engine, tmp_path)
    api = connect(first)
    finished = wait_for(api, api.videos.create(prompt="kept", **TINY_VIDEO).id, ("completed",))
    mp4 = api.videos.download_content(finished.id).read()
    running = api.videos.create(prompt="cut short", size="32x32",
                                extra_body={"num_frames": 5, "num_inference_steps": 400})
    wait_for(api, running.id, ("in_progress",))
    first.stop()
    # a hard kill leaves a job "in_progress" in the store: simulate one
    crashed = new_video_id()
    store = VideoStore(tmp_path)
    store.insert(VideoJob(id=crashed, created_at=int(time.time()), status="in_progress", model="tiny",
                          prompt="lost", size="32x32", seconds="1", progress=40))
    store.close()

    second = serve(video_engine, tmp_path)
    try:
        api = connect(second)
        assert api.videos.retrieve(finished.id).status == "completed"
        assert api.videos.download_content(finished.id).read() == mp4
        stopped = api.videos.retrieve(running.id)
        assert stopped.status == "failed" and stopped.error.code == "server_shutdown"
        lost = api.videos.retrieve(crashed)
        assert lost.status == "failed" and lost.error.code == "server_restarted" and lost.error.message
        assert {finished.id, running.id, crashed} <= {v.id for v in api.videos.list()}
    finally:
        second.stop()


def test_late_progress_never_revives_a_failed_job(tmp_path: Path) -> None:
    store = VideoStore(tmp_path)
    job_id = new_video_id()
    store.insert(VideoJob(id=job_id, created_at=0, status="in_progress", model="m", prompt="p", size="8x8",
                          seconds="1"))
    assert store.fail_interrupted("server_shutdown", "stopped") == 1
    store.update_progress(job_id, 50)  # the engine finishing its current step after the abort
    job = store.get(job_id)
    assert (job.status, job.error_code, job.progress) == ("failed", "server_shutdown", 0)
    store.close()
