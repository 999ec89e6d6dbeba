import pytest
import torch
import triton_setup  # noqa: F401  Triton's interpreter on before any test module imports Triton, whatever the order


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny models are bound by per-op overhead, and a second OpenMP thread
    only adds contention on a busy host."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def task_tokenizer():
    """A byte-level BPE tokenizer of 320 ids, trained on chain_sum problems in R1-Zero's template with their
    solutions and answers: the tokenizer of `tiny_checkpoint`. Shared by the session: do not change it."""
    from seekforge.tasks import get_task, r1_zero_prompt
    from seekforge.tokenizer import Tokenizer

    rows = get_task("chain_sum").rows("train", 200, 0)
    texts = [r1_zero_prompt(r.prompt) + "\n" + r.solution + "\n</think>\n<answer>" + r.answer + "</answer>"
             for r in rows]
    return Tokenizer.train(texts, 320)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, task_tokenizer):
    """`tiny_checkpoint(**overrides)`: the directory of a random tiny MoE + MLA model with one MTP module (the
    "tiny" preset at width 64 and two layers, seed 0), `task_tokenizer` beside it. `overrides` change its
    ModelConfig (`n_mtp_modules=0`, `init_std=0.1`, ...); each variant is written once a session and shared, so
    a test copies the directory before changing files in it."""
    from seekforge.model import ModelConfig, Transformer

    written = {}

    def checkpoint(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in written:
            cfg = ModelConfig.preset("tiny").replace(**{
                "vocab_size": task_tokenizer.vocab_size, "dim": 64, "inter_dim": 128, "moe_inter_dim": 32,
                "n_layers": 2, "max_seq_len": 512, **overrides})
            path = tmp_path_factory.mktemp("tiny")
            torch.manual_seed(0)
            Transformer(cfg).save_pretrained(path)
            task_tokenizer.save_pretrained(path)
            written[key] = path
        return written[key]

    return checkpoint
