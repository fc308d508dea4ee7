"""LLM gateway sidecar: streams, meters and routes LLM API traffic beside Nginx."""

__version__ = "0.1.0"
