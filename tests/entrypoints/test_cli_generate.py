"""`ditserve generate` writes the file the user asked for, and turns bad input into one clear line."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
from PIL import Image

from ditserve import OmniDiffusionSamplingParams
from ditserve.entrypoints.cli import main
from ditserve.entrypoints.media import image_bytes, save_output, video_bytes
from ditserve.errors import InvalidParameterError
from ditserve.request import RequestOutput


def test_generate_writes_a_png_and_reports_seed_and_timings(tiny_flux_dir: str, tmp_path, capsys) -> None:
    out = tmp_path / "out.png"
    code = main(["generate", "a red circle", "-o", str(out), "--model", tiny_flux_dir, "--steps", "2",
                 "--seed", "5", "--height", "64", "--width", "64"])
    assert code == 0
    image = Image.open(out)
    assert image.size == (64, 64)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["outputs"] == [str(out)]
    assert summary["seed"] == 5
    assert summary["timings"]["denoise_s"] > 0


def test_generate_bad_input_is_one_line_not_a_traceback(tiny_flux_dir: str, tmp_path, capsys) -> None:
    code = main(["generate", "a cat", "-o", str(tmp_path / "x.png"), "--model", tiny_flux_dir, "--steps", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "num_inference_steps" in err and "Traceback" not in err


def test_layers_reach_the_sampling_params_and_a_family_without_them_names_the_field(tiny_flux_dir: str, tmp_path,
                                                                                      capsys) -> None:
    code = main(["generate", "a cat", "-o", str(tmp_path / "x.png"), "--model", tiny_flux_dir, "--layers", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "layers" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_several_images_are_written_numbered_in_order(tmp_path) -> None:
    layers = [Image.new("RGBA", (8, 6), (index * 80, 0, 0, 255 - index * 100)) for index in range(3)]
    output = RequestOutput("r", "p", 0, OmniDiffusionSamplingParams(), images=layers)
    written = save_output(output, str(tmp_path / "layer.png"))
    assert written == [str(tmp_path / f"layer-{index}.png") for index in range(3)]
    for path, layer in zip(written, layers, strict=True):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(layer))  # RGBA kept, order kept
    assert not (tmp_path / "layer.png").exists()


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
