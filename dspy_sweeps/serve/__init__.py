"""Serving a registered program: `sweep serve NAME@ALIAS` (FastAPI + uvicorn, Prometheus metrics,
following the alias) and the same app as a Ray Serve deployment (`--ray`)."""
