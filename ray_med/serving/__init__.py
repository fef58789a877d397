"""Serving: pydantic schemas, the engines the deployments run, and ``build_app`` (``app.py``, the Ray edge)."""
