"""The OpenAI-compatible server (`seekforge serve`): FastAPI app, engine driver, wire format, metrics."""

from seekforge.server.app import create_app, serve
from seekforge.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app", "serve"]
