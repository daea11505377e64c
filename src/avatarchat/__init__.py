"""Avatar Chat: a real-time talking-avatar conversation system that runs on a CPU."""

__version__ = "0.1.0"
