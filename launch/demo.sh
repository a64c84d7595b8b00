#!/usr/bin/env bash
# The tiny growth job on the embedded default data (World English Bible), end to end:
# set up .venv, grow 6 blocks right to left and fine-tune the whole stack, show the run, export a stock Hugging Face
# model, sample from both the run and the export, and score both on the local held-out Bible
# cloze tasks through lm-evaluation-harness (docs/evaluate.md). A second call resumes / reuses.
set -euo pipefail
EXTRAS=demo,eval
source "$(dirname "$0")/setup_env.sh"
RUN="${RUN:-runs/demo}"
EXPORT="${EXPORT:-$RUN-hf}"
if [ -f "$RUN/grow.yaml" ]; then
  grow train configs/tiny.yaml --out "$RUN" --resume "$@"
else
  grow train configs/tiny.yaml --out "$RUN" "$@"
fi
grow status "$RUN"
grow export "$RUN" --out "$EXPORT" --overwrite
echo "--- depth sampler (one forward pass through the grown stack) on the run:"
grow sample "$RUN" --prompt "In the beginning" --length 48 --mode depth --seed 0
echo "--- iterative sampler (32 steps) on the exported EuroBertForMaskedLM:"
grow sample "$EXPORT" --prompt "In the beginning" --length 48 --mode iterative --steps 32 --seed 0
echo "--- semi-autoregressive sampler (blocks of 32) on the export:"
grow sample "$EXPORT" --prompt "And Jesus said" --length 32 --mode semi-ar --seed 0
echo "--- lm-evaluation-harness: next-word cloze on held-out verses (chance 0.25), run and export:"
TASKS=tests/tasks/bible_cloze.yaml,tests/tasks/bible_cloze_matched.yaml
grow eval "$RUN" --tasks "$TASKS" --seed 0
grow eval "$EXPORT" --tasks "$TASKS" --seed 0
