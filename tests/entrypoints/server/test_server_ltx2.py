"""LTX-2 over HTTP: ``/v1/videos`` with ``seconds`` and ``fps`` on the tiny LTX2Pipeline makes ``seconds * fps + 1``
frames at that frame rate, and its MP4 carries the model's sound track as AAC beside the H.264 video, as the
offline run of the same request gives them."""

from __future__ import annotations

import io
from collections.abc import Iterator

import av
import httpx
import numpy as np
import pytest

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.media import output_video_bytes, video_bytes
from ditserve.entrypoints.server.thread import ServerThread
from ditserve.request import AudioTrack
from ditserve.testing import tiny_pipeline_dir
from tests.entrypoints.server.conftest import make_engine, start
from tests.entrypoints.server.test_server_image_to_video import mean_difference
from tests.entrypoints.server.test_server_video_forms import frames_of, wait_done

#: 1 second at 4 fps: 5 frames, which the tiny VAE (2x in time) takes
FIELDS = {"prompt": "a ball", "size": "32x32", "seconds": "1", "fps": "4", "num_inference_steps": "2", "seed": "6"}


@pytest.fixture(scope="module")
def ltx2_engine() -> Iterator[DiffusionEngine]:
    engine = make_engine(tiny_pipeline_dir("ltx2"), limits={"max_steps": 400, "max_image_size": 64, "max_n": 1,
                                                            "max_frames": 9})
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def ltx2_server(ltx2_engine: DiffusionEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    server = start(ltx2_engine, tmp_path_factory.mktemp("ltx2-server"))
    yield server
    server.stop()


def sound_of(mp4: bytes) -> tuple[av.AudioStream, np.ndarray]:
    """The MP4's audio stream and its decoded samples (channels x samples)."""
    with av.open(io.BytesIO(mp4)) as container:
        (stream,) = container.streams.audio
        samples = np.concatenate([frame.to_ndarray() for frame in container.decode(audio=0)], axis=1)
        return stream, samples


def test_a_sound_track_is_muxed_as_aac() -> None:
    rate = 16000
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(rate // 4) / rate, dtype=np.float32)
    mp4 = video_bytes(np.zeros((3, 16, 16, 3), np.uint8), 12, AudioTrack(np.stack([tone, -tone]), rate))
    stream, samples = sound_of(mp4)
    assert stream.codec_context.name == "aac" and stream.rate == rate and stream.channels == 2
    assert samples.shape[1] >= tone.size  # the encoder pads to whole AAC frames
    assert len(frames_of(mp4)) == 3
    assert np.abs(samples).max() > 0.25  # the tone, not silence


def test_video_job_with_seconds_and_fps_carries_the_sound_track(ltx2_server: ServerThread,
                                                               ltx2_engine: DiffusionEngine) -> None:
    created = httpx.post(f"{ltx2_server.url}/v1/videos", data=FIELDS, timeout=60)
    assert created.status_code == 200, created.text
    job = wait_done(ltx2_server, created.json()["id"], timeout_s=120)
    assert job["status"] == "completed", job
    assert job["num_frames"] == 5 and job["fps"] == 4 and job["seconds"] == "1"
    content = httpx.get(f"{ltx2_server.url}/v1/videos/{job['id']}/content", timeout=60)
    assert content.status_code == 200
    frames = frames_of(content.content)
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
    params = OmniDiffusionSamplingParams(height=32, width=32, num_frames=5, fps=4, num_inference_steps=2, seed=6)
    offline = ltx2_engine.generate([ltx2_engine.make_request("a ball", params)])[0]
    assert mean_difference(frames, frames_of(output_video_bytes(offline))) == 0
    stream, samples = sound_of(content.content)
    track = offline.audio[0]
    assert stream.rate == track.sample_rate and stream.channels == track.samples.shape[0]
    assert samples.shape[1] >= track.samples.shape[1]


def test_sync_video_carries_the_sound_track(ltx2_server: ServerThread) -> None:
    answer = httpx.post(f"{ltx2_server.url}/v1/videos/sync", data=FIELDS, timeout=120)
    assert answer.status_code == 200 and answer.headers["content-type"] == "video/mp4", answer.text
    assert len(frames_of(answer.content)) == 5
    stream, _ = sound_of(answer.content)
    assert stream.codec_context.name == "aac"
