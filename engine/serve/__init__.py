"""HTTP retrieval server: `python -m engine.serve`. The core (batching, index consistency) is engine.serve.core;
the FastAPI layer (engine.serve.app) only parses requests and maps errors to status codes."""
from .app import create_app
from .core import ServeConfig, ServerCore
from .metrics import ServerMetrics

__all__ = ["ServeConfig", "ServerCore", "ServerMetrics", "create_app"]
