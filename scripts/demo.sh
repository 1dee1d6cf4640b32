#!/usr/bin/env bash
# The pipeline on the embedded SmolLM2-135M, offline, on CPU. Every step is a plain `llm-trm` command
# with a config from configs/demo/; outputs and TensorBoard logs land in runs/demo/, and the demo ends
# with its own summary (runs/demo/summary.md + summary.json), every number read from those outputs.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

mkdir -p runs/demo
TIMINGS=runs/demo/timings.tsv
: > "$TIMINGS"  # this run's step times (the summary reads them)

# step NAME DESCRIPTION COMMAND...: print a header, run the command, record its wall time
step() {
    local name=$1 description=$2 started=$SECONDS
    shift 2
    printf '\n\033[1m==> %s\033[0m\n' "$description"
    "$@"
    printf '%s\t%d\n' "$name" "$((SECONDS - started))" >> "$TIMINGS"
}

step stage1a "Phase 1a: compressor on general text (CPython reference docs)" \
    llm-trm fit --config configs/demo/stage1a.yaml

step datagen "Phase 2 data: the LLM thinks on the demo's problems; hidden-state pairs are written as shards" \
    llm-trm datagen --config configs/demo/datagen.yaml
step verify "Checking every shard (checksums, shapes, finite states, closed share per dataset)" \
    llm-trm datagen --verify runs/demo/hidden_pairs

step stage1b "Phase 1b: the compressor fine-tuned on the LLM's own thinking (the datagen records)" \
    llm-trm fit --config configs/demo/stage1b.yaml

step trm "Phase 2: the TRM learns to predict the end-of-thinking state (held-out metrics vs baselines)" \
    llm-trm fit --config configs/demo/trm.yaml

step bridge "Phase 2b: the bridge learns the way into the LLM (vs the concept token, no vector, shuffled states)" \
    llm-trm fit --config configs/demo/bridge.yaml

step evaluate "Evaluation: CoT, no thinking, the TRM in place of thinking, the oracles; CoT fidelity" \
    llm-trm evaluate --config configs/demo/evaluate.yaml

step grpo "Phase 3: GRPO fine-tunes TRM, compressor and bridge on answer correctness (LLM frozen)" \
    llm-trm fit --config configs/demo/grpo.yaml
step evaluate_after_grpo "Evaluation after GRPO (the trm mode with the GRPO parts)" \
    llm-trm evaluate --config configs/demo/evaluate.yaml --trm runs/demo/grpo_model \
        --compressor runs/demo/grpo_model/compressor --adapter auto --modes '[cot, no_think, trm]' \
        --output_dir runs/demo/eval_after_grpo

printf '\n\033[1m==> %s\033[0m\n' "Summary (runs/demo/summary.md)"
python scripts/demo_summary.py runs/demo

cat <<MSG

Outputs:
  runs/demo/summary.md       what the demo produced, every number read from the outputs below (+ summary.json)
  runs/demo/compressor_1a/   stage 1a compressor (compressor.safetensors + config.json)
  runs/demo/hidden_pairs/    hidden-pair shards (+ per-sample records with thinking, answer, correctness)
  runs/demo/compressor_1b/   stage 1b compressor
  runs/demo/trm_model/       the trained TRM (EMA weights) + metrics.json (val / test)
  runs/demo/bridge_model/    the trained bridge + metrics.json (val / test)
  runs/demo/eval/            evaluation report (tables, JSON, CSV, figures)
  runs/demo/grpo_model/      TRM + compressor + bridge after GRPO; runs/demo/eval_after_grpo/ its evaluation
  runs/demo/stage1a/, stage1b/, trm/, bridge/, grpo/   checkpoints and TensorBoard logs
Explore them in notebooks/ (make notebooks executes them).
See the curves with:  tensorboard --logdir runs/demo
MSG
