"""Schema-driven fuzzing (schemathesis) of every operation in our OpenAPI schema, in positive and negative
modes: never a 5xx, never a 2xx for input the schema rules out, and the server answers afterwards.

The engine behind it has tight limits (2 steps, 32 px, n <= 2) and defaults within them (a copy of the tiny
model with a ``ditserve_defaults.json``), so valid random requests really generate, and stay cheap.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection

from ditserve.config import OmniDiffusionConfig
from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.server.thread import ServerThread
from ditserve.models.loader import DEFAULTS_FILE
from ditserve.testing import tiny_pipeline_dir

EXAMPLES_PER_OPERATION_AND_MODE = 8
TIGHT_LIMITS = {"max_steps": 2, "max_image_size": 32, "max_n": 2, "max_frames": 5}
TIGHT_DEFAULTS = {"num_inference_steps": 1, "height": 16, "width": 16}


@pytest.fixture(scope="module")
def fuzz_server(tiny_flux_dir: str, tmp_path_factory: pytest.TempPathFactory,
                serve: Callable[..., ServerThread]) -> Iterator[ServerThread]:
    model_dir = tmp_path_factory.mktemp("fuzz-model") / "tiny-flux"
    shutil.copytree(tiny_flux_dir, model_dir)
    (model_dir / DEFAULTS_FILE).write_text(json.dumps({"sampling_defaults": TIGHT_DEFAULTS}))
    engine = DiffusionEngine(OmniDiffusionConfig(model=str(model_dir), max_queue_size=16, limits=TIGHT_LIMITS))
    server = serve(engine, tmp_path_factory.mktemp("fuzz-server"))
    yield server
    server.stop()
    engine.close()


#: answers that reject invalid data: schemathesis' defaults, and 413, because a negative example can be a body over
#: the server's size limit (a chat request's nested messages each carry up to MAX_TEXT_CHARS of text)
REJECTIONS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]


def operations(server: ServerThread) -> list:
    config = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}}})
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)
    return [result.ok() for result in schema.get_all_operations()]


def has_inputs(operation: object) -> bool:
    """Negative data needs something to corrupt: a body, a query or a path parameter."""
    return any(len(getattr(operation, part)) for part in ("body", "query", "path_parameters"))


def fuzz(operation: object, mode: GenerationMode, base_url: str, statuses: Counter[str]) -> None:
    @settings(max_examples=EXAMPLES_PER_OPERATION_AND_MODE, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        response = case.call_and_validate(base_url=base_url, checks=[not_a_server_error, negative_data_rejection],
                                          timeout=60)
        statuses[f"{operation.label} {mode.value} {response.status_code}"] += 1

    run()


def test_schema_fuzzing_finds_no_server_errors(fuzz_server: ServerThread) -> None:
    found = operations(fuzz_server)
    labels = {op.label for op in found}
    assert {"POST /v1/images/generations", "POST /v1/images/edits", "POST /v1/videos",
            "GET /v1/videos/{video_id}", "DELETE /v1/videos/{video_id}", "POST /v1/chat/completions",
            "POST /v1/videos/sync"} <= labels
    statuses: Counter[str] = Counter()
    for operation in found:
        fuzz(operation, GenerationMode.POSITIVE, fuzz_server.url, statuses)
        if has_inputs(operation):
            fuzz(operation, GenerationMode.NEGATIVE, fuzz_server.url, statuses)
    # every operation was really exercised: valid generation requests generated, corrupted ones were refused
    exercised = {key.rsplit(" ", 2)[0] for key in statuses}
    assert labels == exercised, labels - exercised
    assert statuses["POST /v1/images/generations positive 200"] >= 1, statuses
    assert statuses["POST /v1/images/generations negative 400"] >= EXAMPLES_PER_OPERATION_AND_MODE // 2
    assert httpx.get(f"{fuzz_server.url}/health").json()["status"] == "ok"


@pytest.mark.parametrize("family, labels", [
    ("wan_ti2v_i2v", ("POST /v1/videos", "POST /v1/videos/sync", "POST /v1/chat/completions")),
    ("qwen_image_edit", ("POST /v1/images/edits", "POST /v1/chat/completions")),
])
def test_video_and_edit_bodies_on_their_own_models(family: str, labels: tuple[str, ...],
                                                   tmp_path_factory: pytest.TempPathFactory,
                                                   serve: Callable[..., ServerThread]) -> None:
    """The image model above answers the video and edit routes before reading their bodies: here a model of each
    kind reads them (input_reference, image_reference, url, lora as fields, forms and JSON)."""
    engine = DiffusionEngine(OmniDiffusionConfig(model=tiny_pipeline_dir(family), max_queue_size=16,
                                                 limits=TIGHT_LIMITS))
    server = serve(engine, tmp_path_factory.mktemp(f"fuzz-{family}"))
    try:
        found = {op.label: op for op in operations(server)}
        statuses: Counter[str] = Counter()
        for label in labels:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz(found[label], mode, server.url, statuses)
        assert {key.rsplit(" ", 2)[0] for key in statuses} == set(labels), statuses
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    finally:
        server.stop()
        engine.close()


def test_schema_documents_the_errors_we_answer(fuzz_server: ServerThread) -> None:
    paths = httpx.get(f"{fuzz_server.url}/openapi.json").json()["paths"]
    generations = paths["/v1/images/generations"]["post"]["responses"]
    assert "422" not in generations and "error" in str(generations["400"])
    assert "404" in paths["/v1/videos/{video_id}"]["get"]["responses"]
    assert set(paths["/v1/videos"]["post"]["requestBody"]["content"]) == {
        "application/json", "multipart/form-data", "application/x-www-form-urlencoded"}


def test_every_reference_in_the_schema_resolves(fuzz_server: ServerThread) -> None:
    """A body whose ``$ref`` points nowhere is skipped by schema readers: the fuzzer never generated the video and
    edit bodies while their nested models (lora, image_reference) were referred to as ``#/$defs/...``."""
    document = httpx.get(f"{fuzz_server.url}/openapi.json").json()

    def references(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            yield from ([node["$ref"]] if "$ref" in node else [])
            for value in node.values():
                yield from references(value)
        elif isinstance(node, list):
            for item in node:
                yield from references(item)

    for reference in set(references(document)):
        target: object = document
        for part in reference.removeprefix("#/").split("/"):
            assert isinstance(target, dict) and part in target, f"{reference} points nowhere"
            target = target[part]
    video = document["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
    for media_type in ("application/json", "multipart/form-data"):
        lora = video[media_type]["schema"]["properties"]["lora"]
        assert "name" in str(lora) and "$defs" not in str(video[media_type]), media_type
