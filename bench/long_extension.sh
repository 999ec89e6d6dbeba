#!/usr/bin/env bash
# Context extension at GPU scale (docs/LONG_CONTEXT.md, "GPU runs to make"): the `small` preset (~100M
# parameters) trained at 1K tokens, first with one document to a row (rows=documents) and a length curriculum,
# where passkey retrieval is learned, then on packed windows, where text after a document's end is (a model of
# document rows only breaks down on windows that cross documents, which perplexity reads); then YaRN factor 16,
# stages 4K and 16K (packed); then eval-long of base, base + YaRN untrained, stage 1 and stage 2 (perplexity at
# 1K..16K, passkey grid). Everything lands in $OUT.
#
# Run from the repository root with PYTHONPATH set to it, e.g.
#   export PYTHONPATH=$PWD TMPDIR=/dev/shm OUT=out; bash bench/long_extension.sh
# GPU_LONG_TINY=1: the same path at toy sizes on the CPU (a smoke test of this script, about 3 minutes).
# GPU_LONG_RECIPE=passkey: docs/LONG_CONTEXT.md's passkey recipe instead: a base on passkey documents of the whole
# context trained on the key, no packed phase, stages of 90% key-trained passkey documents one to a row.
# GPU_LONG_BUDGET: seconds for the whole script (default 540); each phase runs under `timeout`, so a phase that
# overruns is cut and what came before it stays in $OUT.
set -uo pipefail
OUT=${OUT:?set OUT to the results folder}
mkdir -p "$OUT"
RUNS=${GPU_LONG_RUNS:-$OUT/runs}
BUDGET=${GPU_LONG_BUDGET:-540}
T0=$(date +%s)
left() { local n=$(( BUDGET - ($(date +%s) - T0) )); echo $(( n > 20 ? n : 20 )); }  # at least 20 s a phase
log() { echo "[long_extension $(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/log.txt"; }

if [ "${GPU_LONG_TINY:-0}" = 1 ]; then
  LEN=64; DEVICE=cpu; EVAL_RESERVE=90; DOCS_LIMIT=${GPU_LONG_BASE_LIMIT:-150}; PACKED_LIMIT=60
  export OMP_NUM_THREADS=1  # a shared CPU: one thread a process
  DOCS=(passkey steps=60 warmup_steps=5 constant_steps=45 decay_steps=10 builtin_docs=1500 eval_every=30
        save_every=10)
  PACKED=(steps=20 lr=3e-4 save_every=10 eval_every=20)
  EXT=(steps=8 warmup_steps=2 tokens_per_step=1024 data_tokens=100000 lr=1e-3)
  EVAL=(2 1)  # passkey samples per cell, perplexity windows
else
  LEN=1024; DEVICE=cuda; EVAL_RESERVE=110; DOCS_LIMIT=${GPU_LONG_BASE_LIMIT:-170}; PACKED_LIMIT=65
  # ~33K tokens a step (32 rows padded to the batch's longest document, at most 1K); 450 steps, ~15M tokens
  DOCS=(small model_overrides.max_seq_len=1024 seq_len=1024 batch_size=32 steps=450 lr=6e-4 warmup_steps=50
        constant_steps=350 decay_steps=50 final_lr=2e-4 eval_every=150 save_every=100 eval_batches=4
        builtin_docs=16000 builtin_vocab=8192 rows=documents curriculum_steps=250 curriculum_min=128
        "builtin_tasks={chain_sum: {}, passkey: {max_filler: 170}}")
  # then 150 packed steps of 32 x 1K on the same data
  PACKED=(steps=150 lr=2e-4 save_every=50 eval_every=150)
  # 64K tokens a step: 16 rows of 4K, then 4 rows of 16K; 60 steps each
  EXT=(steps=60 warmup_steps=5 lr=2e-4 tokens_per_step=65536 data_tokens=2000000)
  EVAL=(8 2)  # passkey samples per cell, perplexity windows
fi

if [ "${GPU_LONG_RECIPE:-perplexity}" = passkey ]; then
  if [ "${GPU_LONG_TINY:-0}" = 1 ]; then FILL="min_filler: 5, max_filler: 6"; else FILL="min_filler: 150, max_filler: 170"; fi
  DOCS+=(curriculum_steps=0 "builtin_tasks={chain_sum: {}, passkey: {$FILL, loss: answer}}")
  EXT+=(passkey_share=0.9 passkey.loss=answer train.rows=documents)
  PACKED_LIMIT=0
fi

python - <<'EOF' 2>&1 | tee -a "$OUT/log.txt"
import importlib.util, platform, torch, seekforge
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "python", platform.python_version())
for mod in ("matplotlib", "tensorboard", "rich", "transformers"):
    print(mod, "ok" if importlib.util.find_spec(mod) else "MISSING (reports without plots)" * (mod == "matplotlib") or "missing")
EOF

# The driver: pretrain.run / extend.run / long_eval as the CLI runs them, except that without matplotlib (a
# declared dependency some images lack) the report cards are skipped instead of failing after each stage.
DRIVER="$OUT/long_extension_driver.py"
cat > "$DRIVER" <<'EOF'
import importlib.util, json, sys, time
from pathlib import Path
from seekforge.train import extend, long_eval, pretrain

PLOTS = importlib.util.find_spec("matplotlib") is not None
if not PLOTS:
    _run = pretrain.run
    pretrain.run = lambda cfg, out, resume=False, report=True: _run(cfg, out, resume, report=False)
mode, args = sys.argv[1], sys.argv[2:]
started = time.perf_counter()
if mode == "base":  # base NAME DIR SECONDS OVERRIDES...: past SECONDS, DIR/final is the last checkpoint's model
    import signal

    def stop(*_):
        raise TimeoutError

    cfg = pretrain.load_train_config(args[0], ["progress=false", "tensorboard=false", *args[3:]])
    signal.signal(signal.SIGALRM, stop)
    signal.alarm(int(args[2]))
    try:
        record = pretrain.run(cfg, args[1])
        signal.alarm(0)
    except TimeoutError:
        trainer = pretrain.build_trainer(cfg, args[1], resume=True)
        record = {"stopped_at_step": trainer.step}
        print(f"[base] out of time: exporting the checkpoint of step {trainer.step}", flush=True)
        trainer.export()
    print(json.dumps({"base_seconds": round(time.perf_counter() - started, 1), "last": {k: v for k, v in record.items()
                      if isinstance(v, (int, float))}}))
elif mode == "extend":
    cfg = extend.load_extend_config("toy", ["eval=false", "progress=false", "tensorboard=false",
                                            f"init_from={args[0]}", *args[2:]])
    print(json.dumps(extend.run(cfg, args[1], resume=True)))
elif mode == "eval":  # eval OUT ORIGINAL DATA DEVICE SAMPLES WINDOWS LABEL=CKPT[@yarn] ...
    out, original, data, device, samples, windows = args[0], int(args[1]), args[2], args[3], int(args[4]), int(args[5])
    yarn = extend.ExtendConfig().yarn(original)
    models = {}
    for item in args[6:]:
        label, _, path = item.partition("=")
        path, _, untrained = path.partition("@")
        models[label] = (Path(path), yarn if untrained else None)
    results = long_eval.evaluate_models(models, data, original, [1, 2, 4, 8, 16], [0, 0.25, 0.5, 0.75, 1],
                                        samples, windows, 0, device, out)
    plots = long_eval.plot(results, out) if PLOTS else []
    Path(out, "report.md").write_text("\n".join(["# Long-context evaluation", "",
                                                 *long_eval.markdown(results, plots, out)]))
    print(json.dumps({label: r["rise"] for label, r in results["models"].items()}))
    print(json.dumps({label: dict(zip(r["passkey"]["lengths"],
                                      [round(sum(c) / len(c), 3) for c in zip(*r["passkey"]["accuracy"])]))
                      for label, r in results["models"].items()}))
print(f"[{mode}] {time.perf_counter() - started:.1f} s", flush=True)
EOF

log "base, document rows: $LEN tokens, budget $(left) s"
timeout $(( DOCS_LIMIT + 40 )) python "$DRIVER" base "${DOCS[0]}" "$RUNS/base-docs" "$DOCS_LIMIT" "${DOCS[@]:1}" \
  device=$DEVICE 2>&1 | grep -v Warning | tee -a "$OUT/log.txt" | tail -3
if [ ! -f "$RUNS/base-docs/final/config.json" ]; then
  log "base did not finish (see log.txt): no extension"; exit 1
fi
if [ "$PACKED_LIMIT" -gt 0 ]; then
  log "base, packed windows, from base-docs"
  timeout $(( PACKED_LIMIT + 40 )) python "$DRIVER" base "${DOCS[0]}" "$RUNS/base" "$PACKED_LIMIT" "${DOCS[@]:1}" \
    init_from="$RUNS/base-docs/final" data="$RUNS/base-docs/data" tokenizer="$RUNS/base-docs/data/tokenizer" \
    rows=packed curriculum_steps=0 warmup_steps=0 constant_steps=0 decay_steps=0 "${PACKED[@]}" device=$DEVICE \
    2>&1 | grep -v Warning | tee -a "$OUT/log.txt" | tail -3
fi
if [ ! -f "$RUNS/base/final/config.json" ]; then
  [ "$PACKED_LIMIT" -gt 0 ] && log "the packed phase did not finish: the base is base-docs"
  rm -rf "$RUNS/base"; cp -r "$RUNS/base-docs" "$RUNS/base"
fi

LIMIT=$(( $(left) - EVAL_RESERVE )); [ "$LIMIT" -lt 30 ] && LIMIT=30
log "extend: factor 16, stages 4x and 16x, within $LIMIT s"
timeout "$LIMIT" python "$DRIVER" extend "$RUNS/base/final" "$RUNS/long" factor=16 stages=[4,16] device=$DEVICE \
  "${EXT[@]}" 2>&1 | grep -v Warning \
  | tee -a "$OUT/log.txt" | grep -E '^\[stage|seconds|Error|error' | tail -5

MODELS=("base=$RUNS/base/final" "base + YaRN, untrained=$RUNS/base/final@yarn")
[ "$PACKED_LIMIT" -gt 0 ] && MODELS=("base, document rows only=$RUNS/base-docs/final" "${MODELS[@]}")
DATA=""
for k in 1 2; do
  if [ -f "$RUNS/long/stage$k/final/config.json" ]; then
    MODELS+=("stage $k=$RUNS/long/stage$k/final")
  fi
done
for n in $(( 16 * LEN )) $(( 4 * LEN )); do
  if [ -z "$DATA" ] && [ -f "$RUNS/long/data-$n/meta.json" ]; then DATA=$RUNS/long/data-$n; fi
done
if [ -z "$DATA" ]; then log "no extension data: nothing to evaluate"; exit 1; fi
log "eval-long of ${#MODELS[@]} models on $DATA within $(( $(left) - 5 )) s"
timeout $(( $(left) - 5 )) python "$DRIVER" eval "$OUT/eval" "$LEN" "$DATA" "$DEVICE" "${EVAL[@]}" "${MODELS[@]}" \
  2>&1 | grep -v Warning | tee -a "$OUT/log.txt" | grep -E '^\[eval|^\{' | tail -12

# the small files that tell the story, outside runs/ (checkpoints are large: left out)
for f in base-docs/metrics.jsonl base/metrics.jsonl base/report.md long/summary.json long/stage1/metrics.jsonl long/stage2/metrics.jsonl; do
  [ -f "$RUNS/$f" ] && mkdir -p "$OUT/keep/$(dirname "$f")" && cp "$RUNS/$f" "$OUT/keep/$f"
done
if [ -z "${GPU_LONG_RUNS:-}" ]; then rm -rf "$RUNS"/*/final/*.safetensors "$RUNS"/*/*/final/*.safetensors \
  "$RUNS"/*/checkpoints "$RUNS"/*/*/checkpoints "$RUNS"/*/data*/*.bin "$RUNS"/*/data*/corpus.jsonl; fi
log "done"
