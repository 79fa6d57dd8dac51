"""FLUX.1, FLUX.1-Kontext and the bundled demo model (FluxPipeline, FluxKontextPipeline). Its parts are declared
in ``family.py``."""
