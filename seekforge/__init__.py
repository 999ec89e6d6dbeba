"""seekforge: the DeepSeek-V3/R1 system end to end, in Python and PyTorch.

This front door re-exports the model (`Transformer`, `ModelConfig`, `from_pretrained`), the errors and, on
first use, the engine (`LLM`, `EngineConfig`, `SamplingParams`); it may import seekforge.errors, configio,
model and engine only. The parts below it, lowest first (tests/test_layers.py enforces that none imports a
higher one and that no two import each other): errors and configio; ops (kernels), model, tasks, documents,
chat_template, reasoning; rewards, tokenizer, data; engine; train; rl; server; commands and cli on top.
"""

from seekforge.errors import CheckpointError, ConfigError, SeekforgeError
from seekforge.model import ModelConfig, Transformer

__version__ = "0.1.0"


def from_pretrained(path, dtype=None, device=None, fp8_weights: bool = False) -> Transformer:
    """Load a Hugging Face DeepSeek-V2 / V2-Lite / V3 checkpoint directory as a seekforge Transformer;
    `fp8_weights`: the blocks' weights kept in FP8 with 128x128 block scales (seekforge.model.hf)."""
    from seekforge.model.hf import from_pretrained as _load

    return _load(path, dtype=dtype, device=device, fp8_weights=fp8_weights)


def __getattr__(name: str):
    # The engine is imported on first use, so `import seekforge` stays light.
    if name in ("LLM", "EngineConfig", "SamplingParams"):
        from seekforge import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'seekforge' has no attribute {name!r}")


__all__ = ["CheckpointError", "ConfigError", "ModelConfig", "SeekforgeError", "Transformer", "from_pretrained"]
