"""Writing outputs to files or bytes: images (PNG/JPEG/WebP) and videos (MP4 through PyAV, with an AAC sound track
where the model makes one)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ditserve.errors import InvalidParameterError
from ditserve.request import AudioTrack, RequestOutput

IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
#: formats whose encoder takes a quality (0-100); PNG is lossless and has none
LOSSY_FORMATS = frozenset({"JPEG", "WEBP"})
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
#: formats that keep an alpha channel (JPEG has none: Pillow refuses to write RGBA as JPEG)
ALPHA_FORMATS = frozenset({"PNG", "WEBP"})


def image_format(output_format: str) -> str:
    """Pillow's name of an output format (``"jpg"`` -> ``"JPEG"``), or an error listing the allowed ones."""
    fmt = IMAGE_FORMATS.get(output_format.lower())
    if fmt is None:
        raise InvalidParameterError(f"output_format={output_format!r}; choose one of {sorted(IMAGE_FORMATS)}",
                                    param="output_format")
    return fmt


def check_alpha_format(output_format: str) -> None:
    """Refuse a format that would drop the transparency of RGBA outputs (Qwen-Image-Layered's layers)."""
    if image_format(output_format) not in ALPHA_FORMATS:
        allowed = sorted(name for name, fmt in IMAGE_FORMATS.items() if fmt in ALPHA_FORMATS)
        raise InvalidParameterError(f"output_format={output_format!r} has no alpha channel, and this model makes "
                                    f"transparent (RGBA) images: use one of {allowed}", param="output_format")


def image_bytes(image: Image.Image, output_format: str = "png", quality: int | None = None) -> bytes:
    """The encoded image; ``quality`` (0-100) applies to JPEG and WebP only (None: Pillow's default)."""
    fmt = image_format(output_format)
    if image.mode == "RGBA":
        check_alpha_format(output_format)
    options = {"quality": quality} if quality is not None and fmt in LOSSY_FORMATS else {}
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


#: PyAV's names of the channel layouts a sound track may have
AUDIO_LAYOUTS = {1: "mono", 2: "stereo"}


def video_bytes(frames: np.ndarray, fps: int = 16, audio: AudioTrack | None = None) -> bytes:
    """H.264 MP4 from uint8 frames (T x H x W x 3), with ``audio`` as an AAC track; PyAV's wheel carries its own
    FFmpeg (and its native AAC encoder)."""
    import av

    frames = np.asarray(frames, dtype=np.uint8)
    # yuv420p needs even sides; pad by repeating the last row/column rather than failing
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        # mbtree off: with it, x264 (core 165) gave different streams for the same frames from one encode to the next,
        # depending on what the process had allocated before (7 distinct outputs in 8 encodes of a 480x832x33 video, 9 in
        # 20 of a 32x32 one, single-threaded too); without it every encode matched, as fast, ~9% larger at the same CRF
        stream = container.add_stream("libx264", rate=fps, options={"mbtree": "0"})
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # every stream is declared before the first packet is muxed (the container's header lists them)
        sound = _audio_stream(container, audio) if audio is not None else None
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if sound is not None:
            audio_stream, audio_frame = sound
            # the encoder cuts the samples into AAC frames itself (1024 samples each)
            for packet in [*audio_stream.encode(audio_frame), *audio_stream.encode()]:
                container.mux(packet)
    return buffer.getvalue()


def _audio_stream(container: Any, audio: AudioTrack) -> tuple[Any, Any]:
    """An AAC stream for ``audio``, and the track as one frame to encode."""
    import av

    samples = np.ascontiguousarray(np.clip(audio.samples, -1.0, 1.0), dtype=np.float32)
    layout = AUDIO_LAYOUTS.get(samples.shape[0]) if samples.ndim == 2 else None
    if layout is None:
        raise InvalidParameterError(f"a sound track must be channels x samples with 1 or 2 channels, got shape "
                                    f"{samples.shape}", param="audio")
    stream = container.add_stream("aac", rate=audio.sample_rate, layout=layout)
    frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=layout)
    frame.sample_rate = audio.sample_rate
    return stream, frame


def output_video_bytes(output: RequestOutput, index: int = 0, default_fps: int = 16) -> bytes:
    """The MP4 of one video of ``output``, with its sound track where it has one."""
    audio = output.audio[index] if output.audio else None
    return video_bytes(output.videos[index], output.fps or default_fps, audio)


def save_output(output: RequestOutput, path: str) -> list[str]:
    """Write ``output`` to ``path`` (format from the extension): its video, or its image; several images (layers,
    ``num_outputs_per_prompt``) go to ``<stem>-<i><suffix>`` beside it, in the output's order. Returns the paths."""
    target = Path(path)
    suffix = target.suffix.lower().lstrip(".")
    if output.videos:
        if suffix != "mp4":
            raise InvalidParameterError(f"this model makes videos: use an .mp4 output, not .{suffix}", param="output")
        target.write_bytes(output_video_bytes(output))
        return [str(target)]
    if suffix not in IMAGE_FORMATS:
        raise InvalidParameterError(f"unknown image extension .{suffix}; use one of {sorted(IMAGE_FORMATS)}",
                                    param="output")
    targets = [target] if len(output.images) == 1 else [
        target.with_name(f"{target.stem}-{index}{target.suffix}") for index in range(len(output.images))]
    for image, image_path in zip(output.images, targets, strict=True):
        image_path.write_bytes(image_bytes(image, suffix))
    return [str(image_path) for image_path in targets]
