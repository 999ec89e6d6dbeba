"""ServerConfig: what `seekforge serve` was asked to serve, and how."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from seekforge.engine.config import EngineConfig


@dataclass
class ServerConfig:
    model_path: str
    served_model_names: list[str] = field(default_factory=list)  # empty: the path as given
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on /v1/* when set
    # the engine's settings; the server queues at most max_waiting sequences, past it requests get 503
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(max_waiting=1024))
    health_timeout: float = 30.0  # seconds a /health generation may take before it reports 503
    log_level: str = "info"
    # a seekforge.dual_chain.DualChain (`seekforge serve --dual-chain`): the rule chain beside the model on every
    # text request; each non-streamed response says which chain answered in its `dual_chain` field
    dual_chain: Any = None

    @property
    def model_names(self) -> list[str]:
        return self.served_model_names or [self.model_path]
