import pytest
from diffusers import FluxPipeline

from ditserve.demo import demo_model_path


@pytest.fixture(scope="session")
def demo_pipeline() -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(str(demo_model_path()))
    pipe.set_progress_bar_config(disable=True)
    return pipe
