"""Distillation: the teacher's correct reasoning traces train smaller students (dense or MoE).

    seekforge distill --teacher runs/rl/final --student-config tiny --task chain_sum --out runs/distill
    seekforge distill --teacher T --student-config tiny,student.json --task arithmetic --out D kd_weight=0.5

1. Rejection sampling (seekforge.rl.rejection): the teacher answers `n_prompts` training problems,
   `n_per_prompt` times each (greedy when temperature is 0); completions the accuracy reward scores 1
   are kept, at most one per problem, in DIR/traces.jsonl.
2. Each student is trained from scratch on those traces by SFT (seekforge.train.sft: loss on the
   completions only, packing), with optional logit distillation (kd_weight: KL from the teacher's
   next-token distribution, which needs the teacher's tokenizer, so students share it).
3. With eval_n > 0, the teacher and every student are evaluated greedily on eval_n held-out problems,
   and DIR/summary.json records each student's accuracy, its retention of the teacher's accuracy and
   the parameter counts.

A student is a model shape: a preset name, a config.json, a checkpoint directory (its shape only) or
"teacher" (the teacher's shape), or {model: NAME, model_overrides: {...}, name: LABEL}. It starts from
random weights, or (student_init=teacher) from the teacher's own weights cut down to its shape: fewer
layers, fewer routed experts per MoE layer (the most used ones on the traces), no MTP module; SFT on the
traces (and logit distillation) then recovers what the cut lost. Student k trains in DIR/<label>/ (the usual run
directory: checkpoints, metrics, report, final/ in Hugging Face layout with the tokenizer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from seekforge.configio import atomic_write_text, from_dict, load_config
from seekforge.errors import ConfigError

# How a student trains from scratch (where it differs from SFTConfig's fine-tuning defaults) unless
# DistillConfig.train says otherwise.
STUDENT_TRAINING = dict(lr=3e-3, final_lr=3e-4, steps=300, warmup_steps=20, constant_steps=130, decay_steps=150,
                        seq_len=256, mtp_weight=0.3, eval_every=100)


@dataclass
class DistillConfig:
    teacher: str = ""  # checkpoint directory (HF layout with its tokenizer)
    students: list = field(default_factory=lambda: ["tiny"])  # shapes; see the module doc
    student_overrides: dict = field(default_factory=dict)  # ModelConfig fields for every student
    task: str = "chain_sum"
    task_knobs: dict = field(default_factory=dict)
    template: str = "r1_zero"
    # the teacher's traces
    n_prompts: int = 2000
    n_per_prompt: int = 1
    temperature: float = 0.0  # 0: greedy (one completion per problem)
    max_tokens: int = 256
    # the students' training: any SFTConfig field (steps, lr, batch_size, seq_len, packing, ...)
    train: dict = field(default_factory=dict)
    kd_weight: float = 0.0  # logit distillation weight
    kd_temperature: float = 1.0
    # "scratch": random initialisation; "teacher": start from the teacher's weights cut down to the
    # student's shape (its first n_layers blocks, each MoE layer's most-used routed experts, MTP modules
    # only if the student has them), which needs the teacher's width and attention shape
    student_init: Literal["scratch", "teacher"] = "scratch"
    eval_n: int = 500  # held-out problems for teacher and students (0: skip)
    eval_seed: int = 0
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.students:
            raise ConfigError("distill: give at least one student (--student-config NAME_OR_FILE)")
        if self.temperature == 0 and self.n_per_prompt != 1:
            raise ConfigError("distill: greedy traces (temperature 0) give one completion per problem; "
                              "set n_per_prompt=1 or a temperature > 0")
        for key in ("n_prompts", "n_per_prompt", "max_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"distill: {key} must be >= 1, got {getattr(self, key)}")


def load_distill_config(name_or_path: str | None, overrides: list[str] = ()) -> DistillConfig:
    return load_config(DistillConfig, name_or_path or "default", {"default": {}}, list(overrides))


def student_specs(cfg: DistillConfig) -> list[tuple[str, str, dict]]:
    """(label, model, model_overrides) per student; labels are unique directory names."""
    specs, seen = [], {}
    for item in cfg.students:
        if isinstance(item, str):
            model, overrides, label = item, {}, Path(item).stem if item.endswith(".json") else Path(item).name
        elif isinstance(item, dict) and isinstance(item.get("model"), str):
            unknown = set(item) - {"model", "model_overrides", "name"}
            if unknown:
                raise ConfigError(f"distill: student {item} has unknown key(s) {sorted(unknown)}; use model, "
                                  f"model_overrides, name")
            model, overrides = item["model"], dict(item.get("model_overrides") or {})
            label = item.get("name") or Path(model).name
        else:
            raise ConfigError(f"distill: a student is a name/path or {{model: ..., model_overrides: ...}}, got {item!r}")
        seen[label] = seen.get(label, 0) + 1
        specs.append((label if seen[label] == 1 else f"{label}-{seen[label]}", model,
                      {**cfg.student_overrides, **overrides}))
    return specs


def sample_traces(cfg: DistillConfig, llm, path: Path) -> dict:
    """Rejection-sample the teacher into `path` (SFT rows); returns the sampling statistics."""
    from seekforge.rl.rejection import SampleConfig, rejection_sample, write_jsonl

    scfg = SampleConfig(init_from=cfg.teacher, task=cfg.task, task_knobs=cfg.task_knobs, out=str(path),
                        n_prompts=cfg.n_prompts, n_per_prompt=cfg.n_per_prompt, keep_correct=True, max_per_prompt=1,
                        seed=cfg.seed, temperature=cfg.temperature, max_tokens=cfg.max_tokens, template=cfg.template)
    rows, stats = rejection_sample(llm, scfg, progress=cfg.progress)
    if not rows:
        raise ConfigError(f"the teacher solved none of {cfg.n_prompts} training problems of {cfg.task}: there is "
                          f"nothing to distill; train the teacher more or choose an easier task")
    write_jsonl(path, rows)
    return stats


# Fields a student initialised from its teacher must share with it (the copied tensors' shapes).
SHARED_SHAPE = ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_heads", "q_lora_rank", "kv_lora_rank",
                "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_shared_experts", "n_expert_groups",
                "n_dense_layers")


@torch.no_grad()
def expert_usage(teacher, sequences: list[list[int]], chunk: int) -> dict[str, torch.Tensor]:
    """Tokens routed to each expert of every MoE layer (by module name) over `sequences`, laid end to end."""
    from seekforge.model.moe import add_load

    stream = [t for s in sequences for t in s]
    totals: dict[int, torch.Tensor] = {}  # by layer id
    for lo in range(0, max(len(stream) - 1, 1), chunk):
        window = torch.tensor(stream[lo:lo + chunk + 1]).unsqueeze(0)
        if window.shape[1] < 2:
            break
        out = teacher.loss(window[:, :-1], window[:, 1:], mtp_weight=1.0 if teacher.cfg.n_mtp_modules else 0.0)
        add_load(totals, out.expert_load)
    name_of = {m: name for name, m in teacher.named_modules()}
    moes = teacher.moe_layers()
    return {name_of[moes[layer]]: load for layer, load in totals.items()}


def init_from_teacher(teacher, student_cfg, sequences: list[list[int]]):
    """The student's shape filled with the teacher's weights (see DistillConfig.student_init)."""
    from seekforge.model.transformer import Transformer

    tc = teacher.cfg
    differ = [k for k in SHARED_SHAPE if getattr(student_cfg, k) != getattr(tc, k)]
    bigger = [k for k in ("n_layers", "n_routed_experts", "n_mtp_modules") if getattr(student_cfg, k) > getattr(tc, k)]
    if differ or bigger:
        raise ConfigError(f"student_init=teacher cuts the teacher down: the student must keep its {', '.join(differ)}"
                          f"{' and may not exceed its ' + ', '.join(bigger) if bigger else ''} (or use "
                          f"student_init=scratch)" if differ else
                          f"student_init=teacher cuts the teacher down: the student's {', '.join(bigger)} may not "
                          f"exceed the teacher's (or use student_init=scratch)")
    usage = expert_usage(teacher, sequences, tc.max_seq_len - 1)
    student = Transformer(student_cfg)
    teacher_state = teacher.state_dict()
    keep: dict[str, torch.Tensor] = {}  # MoE module name -> the teacher's experts it keeps, in group order
    groups = student_cfg.n_expert_groups
    for name, load in usage.items():
        per_group = tc.n_routed_experts // groups
        want = student_cfg.n_routed_experts // groups
        chosen = [g * per_group + load[g * per_group:(g + 1) * per_group].topk(want).indices.sort().values
                  for g in range(groups)]
        keep[name] = torch.cat(chosen)
    state = {}
    for key, value in student.state_dict().items():
        source = teacher_state[key]
        module = key.rsplit(".", 2)[0] if ".experts." in key else key.rsplit(".", 1)[0].removesuffix(".gate")
        if source.shape != value.shape and module in keep:
            source = source[keep[module]]
        if source.shape != value.shape:
            raise ConfigError(f"cannot initialise the student's {key} {tuple(value.shape)} from the teacher's "
                              f"{tuple(teacher_state[key].shape)}")
        state[key] = source.clone()
    student.load_state_dict(state)
    return student


def student_config(cfg: DistillConfig, model: str, overrides: dict, traces: Path, init_from: str | None = None):
    from seekforge.train.sft import SFTConfig

    model = cfg.teacher if model == "teacher" else model
    data = {**STUDENT_TRAINING, **cfg.train, "model": model, "model_overrides": overrides, "init_from": init_from,
            "data": str(traces), "tokenizer": cfg.teacher, "seed": cfg.seed, "device": cfg.device,
            "progress": cfg.progress}
    if cfg.kd_weight:
        data.update(teacher=cfg.teacher, kd_weight=cfg.kd_weight, kd_temperature=cfg.kd_temperature)
    return from_dict(SFTConfig, data, where="distill student training")


def parameter_count(path) -> int:
    """Total parameters of the model a checkpoint directory (or preset name) describes."""
    import torch

    from seekforge.model.config import ModelConfig
    from seekforge.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(ModelConfig.load(path)).num_parameters()["total"]


def train_student(cfg: DistillConfig, model: str, overrides: dict, traces: Path, run_dir: Path,
                  resume: bool = False) -> tuple[Path, dict]:
    """SFT one student on the traces in `run_dir`; returns (its final/ directory, the last training record)."""
    from seekforge.train.sft import run as sft

    scfg = student_config(cfg, model, overrides, traces)
    if cfg.student_init == "teacher":
        init = run_dir / "init"
        if not (init / "config.json").is_file():
            _write_pruned_student(cfg, scfg, traces, init)
        scfg = student_config(cfg, str(init), {}, traces, init_from=str(init))
    last = sft(scfg, run_dir, resume=resume and (run_dir / "checkpoints").is_dir())
    return run_dir / "final", last


def _write_pruned_student(cfg: DistillConfig, scfg, traces: Path, path: Path) -> None:
    """The student cut from the teacher, saved (HF layout with the tokenizer) for SFT to start from."""
    from seekforge.model.hf import from_pretrained
    from seekforge.model.config import ModelConfig
    from seekforge.tokenizer import Tokenizer
    from seekforge.train.sft import read_examples

    teacher = from_pretrained(cfg.teacher, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_pretrained(cfg.teacher)
    shape = ModelConfig.load(scfg.model).replace(**{**scfg.model_overrides, "vocab_size": teacher.cfg.vocab_size})
    examples = read_examples(traces, tokenizer)[:256]
    student = init_from_teacher(teacher, shape, [e.ids for e in examples])
    student.save_pretrained(path)
    tokenizer.save_pretrained(path)


def run(cfg: DistillConfig, out_dir: str | Path, resume: bool = False) -> dict:
    """Traces, then every student; returns the summary (also written to DIR/summary.json)."""
    from seekforge.rl.evaluate import EvalConfig, evaluate, load_llm

    if not cfg.teacher:
        raise ConfigError("distill: say which checkpoint teaches (--teacher CKPT)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = student_specs(cfg)
    teacher_llm = load_llm(cfg.teacher, cfg.device)
    traces = out / "traces.jsonl"
    summary: dict = {"teacher": cfg.teacher, "task": cfg.task, "task_knobs": cfg.task_knobs,
                     "teacher_parameters": parameter_count(cfg.teacher)}
    if not (resume and traces.is_file()):
        summary["traces"] = sample_traces(cfg, teacher_llm, traces)
    eval_cfg = EvalConfig(task=cfg.task, task_knobs=cfg.task_knobs, n=cfg.eval_n, seed=cfg.eval_seed,
                          max_tokens=cfg.max_tokens, template=cfg.template) if cfg.eval_n else None
    if eval_cfg is not None:
        summary["teacher_eval"] = evaluate(teacher_llm, eval_cfg)
    del teacher_llm
    summary["students"] = {}
    for label, model, overrides in specs:
        final, last = train_student(cfg, model, overrides, traces, out / label, resume)
        entry = {"model": model, "model_overrides": overrides, "dir": str(final),
                 "parameters": parameter_count(final), "final_loss": last.get("loss")}
        if eval_cfg is not None:
            result = evaluate(load_llm(final, cfg.device), eval_cfg)
            entry["eval"] = result
            teacher_acc = summary["teacher_eval"]["accuracy"]
            entry["retention"] = result["accuracy"] / teacher_acc if teacher_acc else None
        summary["students"][label] = entry
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
