"""The OpenAI-compatible HTTP server: ``kvserve serve`` / ``python -m kvserve.server``.

protocol.py  pydantic request/response models    serving.py  OpenAI request <-> engine request
app.py       FastAPI app, auth, errors            metrics.py  Prometheus collector and histograms
cli.py       flags and the uvicorn runner         bench.py    ``kvserve bench serve``: a load generator
"""
