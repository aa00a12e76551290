"""HTTP retrieval server: `python -m engine.serve`. The core (batching, one writer over the Retriever) is
engine.serve.core; the HTTP layer is engine.serve.app (assembly), .routes, .inputs and .bodies (request
reading), .guards (connection limits, auth), .errors (the one error shape) and .metrics."""
from .app import HttpLimits, create_app
from .core import ServeConfig, ServerCore
from .guards import AccessPolicy
from .metrics import ServerMetrics

__all__ = ["AccessPolicy", "HttpLimits", "ServeConfig", "ServerCore", "ServerMetrics", "create_app"]
