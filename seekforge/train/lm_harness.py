"""lm-evaluation-harness tasks run directly on a checkpoint directory.

seekforge checkpoints are in Hugging Face's DeepSeek-V3 layout with their tokenizer, which transformers loads,
so lm-eval's own `hf` backend reads them: no server, and the scores are lm-eval's reference ones. Prompts get
BOS (`add_bos_token=True`), as `seekforge serve` and the engine feed a text prompt. The model runs in float32
on a CPU (bf16 matmuls are slow there) and in the checkpoint's own dtype elsewhere, as `seekforge eval --task`.

One correction to the backend: for rolling log-likelihood (lm-eval's perplexity tasks, such as wikitext) it
encodes the text with the tokenizer's BOS and then puts its own prefix token, BOS again, before the windows, so
BOS after BOS is scored as a token of the text (lm-eval issue #3333). Here the text is encoded without it: each
text is scored once after one BOS, as `seekforge eval --text` scores it.
"""

from __future__ import annotations

import os
from pathlib import Path

from seekforge.errors import ConfigError

INSTALL = "pip install 'seekforge[eval]' (or: pip install 'lm_eval[hf]')"


def run_tasks(checkpoint: str | os.PathLike, tasks: list[str], limit: int | None = None,
              include_path: str | os.PathLike | None = None, device: str = "auto", batch_size: int = 1) -> dict:
    """lm-eval's results of `tasks` (names, or groups, known to lm-eval or defined in YAML files under
    include_path) on the checkpoint: {"results": {task: {metric: value}}, "n-samples", "versions", ...}."""
    from seekforge.train.optim import pick_device

    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ConfigError(f"--lm-eval needs lm-evaluation-harness, which is not installed ({err}): {INSTALL}") from err
    if not (Path(checkpoint) / "config.json").is_file():
        raise ConfigError(f"{checkpoint} is not a checkpoint directory (no config.json): give the directory of a "
                          "Hugging Face layout checkpoint with its tokenizer")
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path}: no such directory; give the folder of the task YAML files")
    if limit is not None and limit < 1:
        raise ConfigError(f"--lm-eval-limit must be >= 1, got {limit}")
    if not tasks:
        raise ConfigError("--lm-eval needs at least one task name, e.g. --lm-eval hellaswag,arc_easy")
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"lm-eval knows no task {', '.join(unknown)}: check the names (`lm_eval ls tasks`) or "
                          "pass --include-path DIR with the task's YAML file")
    dev = pick_device(device)
    model = _hf_model()(pretrained=str(checkpoint), dtype="float32" if dev.type == "cpu" else "auto", device=str(dev),
                        batch_size=batch_size, add_bos_token=True)
    out = lm_eval.simple_evaluate(model=model, tasks=tasks, limit=limit, task_manager=manager, log_samples=False)
    return {key: out[key] for key in ("results", "groups", "n-samples", "versions") if key in out}


def _hf_model():
    """lm-eval's hf backend with the rolling log-likelihood correction of the module doc."""
    from lm_eval.models.huggingface import HFLM

    class HF(HFLM):
        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            keep, self.add_bos_token = self.add_bos_token, False  # the windows' prefix token is the one BOS
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm)
            finally:
                self.add_bos_token = keep

    return HF
