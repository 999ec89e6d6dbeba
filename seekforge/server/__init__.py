"""The OpenAI-compatible server (`seekforge serve`): FastAPI app (app.py, serving.py), the engine
driver that owns the model (engine_loop.py), the wire format (protocol.py), Prometheus metrics (metrics.py)
and its settings (config.py).

May import seekforge.errors, configio, engine, model, tokenizer, chat_template and reasoning; never the
trainers. Nothing but the commands imports it."""

from seekforge.server.app import create_app, serve
from seekforge.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app", "serve"]
