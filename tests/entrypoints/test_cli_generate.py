"""`ditserve generate` writes the file the user asked for, and turns bad input into one clear line."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
from PIL import Image

from ditserve.entrypoints.cli import main
from ditserve.entrypoints.media import image_bytes, video_bytes
from ditserve.errors import InvalidParameterError


def test_generate_writes_a_png_and_reports_seed_and_timings(tiny_flux_dir: str, tmp_path, capsys) -> None:
    out = tmp_path / "out.png"
    code = main(["generate", "a red circle", "-o", str(out), "--model", tiny_flux_dir, "--steps", "2",
                 "--seed", "5", "--height", "64", "--width", "64"])
    assert code == 0
    image = Image.open(out)
    assert image.size == (64, 64)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["seed"] == 5
    assert summary["timings"]["denoise_s"] > 0


def test_generate_bad_input_is_one_line_not_a_traceback(tiny_flux_dir: str, tmp_path, capsys) -> None:
    code = main(["generate", "a cat", "-o", str(tmp_path / "x.png"), "--model", tiny_flux_dir, "--steps", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "num_inference_steps" in err and "Traceback" not in err


def test_video_bytes_is_a_decodable_mp4() -> None:
    frames = np.random.default_rng(0).integers(0, 255, size=(5, 31, 33, 3), dtype=np.uint8)
    data = video_bytes(frames, fps=8)
    import io

    with av.open(io.BytesIO(data)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 5
    assert decoded[0].shape == (32, 34, 3)  # padded to even sides for yuv420p


def test_image_bytes_rejects_unknown_formats() -> None:
    image = Image.new("RGB", (8, 8))
    assert image_bytes(image, "jpeg")[:2] == b"\xff\xd8"
    with pytest.raises(InvalidParameterError, match="output_format"):
        image_bytes(image, "gif")
