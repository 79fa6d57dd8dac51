"""FLUX.1 and the bundled demo model (FluxPipeline). Its parts are declared in ``family.py``."""
