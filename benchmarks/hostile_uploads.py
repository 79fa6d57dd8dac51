"""Memory under the upload attack of issue 18: 16 concurrent requests of 16 small PNGs each (solid 2048x2048
images, about 12 kB compressed, 12 MiB decoded), sent to /v1/images/edits and /v1/videos of a server whose
model takes none (the tiny FLUX, text-to-image) and to the edits of a model that takes one (tiny
Qwen-Image-Edit), with the default limits (max_image_size 2048). Prints the server process's RSS before, its
peak (VmHWM) and its RSS after, and the status codes. Not a test: the figures depend on the machine.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/hostile_uploads.py
"""

from __future__ import annotations

import collections
import io
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

from ditserve.config import OmniDiffusionConfig
from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.server import ServerSettings, create_app
from ditserve.entrypoints.server.thread import ServerThread
from ditserve.testing import tiny_pipeline_dir

REQUESTS = 16
IMAGES_PER_REQUEST = 16
SIDE = 2048


def memory_mib() -> dict[str, float]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def solid_png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), (seed * 13 % 256, 80, 160)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def attack(url: str, route: str, field: str, pngs: list[bytes]) -> collections.Counter:
    files = [(field, (f"{i}.png", data, "image/png")) for i, data in enumerate(pngs)]

    def one(_index: int) -> int:
        return httpx.post(url + route, data={"prompt": "x"}, files=files, timeout=120).status_code

    with ThreadPoolExecutor(REQUESTS) as pool:
        return collections.Counter(pool.map(one, range(REQUESTS)))


def main() -> None:
    pngs = [solid_png(i) for i in range(IMAGES_PER_REQUEST)]
    uploaded_mb = REQUESTS * sum(map(len, pngs)) / 1e6
    report = {"uploaded_per_route_mb": round(uploaded_mb, 2)}
    with tempfile.TemporaryDirectory() as folder:
        for name, model, routes in (("text-to-image", tiny_pipeline_dir("flux"),
                                     (("/v1/images/edits", "image"), ("/v1/videos", "input_reference"))),
                                    ("edit", tiny_pipeline_dir("qwen_image_edit"),
                                     (("/v1/images/edits", "image"),))):
            engine = DiffusionEngine(OmniDiffusionConfig(model=model, max_queue_size=64))
            server = ServerThread(create_app(engine, ServerSettings(served_model_name="tiny",
                                                                  output_dir=Path(folder) / name)))
            for route, field in routes:
                before = memory_mib()
                statuses = attack(server.url, route, field, pngs)
                after = memory_mib()
                report[f"{name} {route}"] = {"statuses": dict(statuses), "rss_before_mib": round(before["VmRSS"]),
                                             "peak_mib": round(after["VmHWM"]), "rss_after_mib": round(after["VmRSS"])}
            server.stop()
            engine.close()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
