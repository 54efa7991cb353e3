"""base-worker: a task-execution daemon serving function calls over HTTP in prioritised slots."""

from worker.functions import function, service, tag

__version__ = "0.1.0"
__all__ = ["__version__", "function", "service", "tag"]
