"""/health tells a load balancer the truth: 200 while the engine runs, 503 once it is down."""

from __future__ import annotations

from fastapi.testclient import TestClient

from ditserve.config import OmniDiffusionConfig
from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.server.app import ServerSettings, create_app


def test_health_reports_a_dead_engine_as_503(tiny_flux_dir: str, tmp_path) -> None:
    engine = DiffusionEngine(OmniDiffusionConfig(model=tiny_flux_dir))
    app = create_app(engine, ServerSettings(served_model_name="tiny", output_dir=tmp_path))
    client = TestClient(app, base_url="http://localhost")  # the Host a local client sends
    assert client.get("/health").status_code == 200
    engine.close()
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json()["status"] == "engine_down"
