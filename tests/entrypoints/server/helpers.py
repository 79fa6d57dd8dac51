"""Helpers shared by the server tests."""

from __future__ import annotations

import time
from typing import Any

import openai


def wait_for(api: openai.OpenAI, video_id: str, statuses: tuple[str, ...], timeout_s: float = 60) -> Any:
    """Poll a video job until its status is one of ``statuses``."""
    deadline = time.monotonic() + timeout_s
    video = None
    while time.monotonic() < deadline:
        video = api.videos.retrieve(video_id)
        if video.status in statuses:
            return video
        time.sleep(0.05)
    last = f"; last: {video.status} {video.progress}%" if video is not None else ""
    raise AssertionError(f"{video_id} never reached {statuses}{last}")
