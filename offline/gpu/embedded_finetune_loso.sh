#!/usr/bin/env bash
# The fine-tuned embedded guard's leave-one-source-out table (issue 10), on a GPU machine that
# has neither the shared data nor the packaged encoder.
#
# Here, once (CPU, about 30 s; writes the ignored folder .gpu/embedded-ft, ~48 MiB):
#   python -m offline.embedded_finetune_pack --data-dir ../shared/data --out .gpu/embedded-ft
# There, from the repository root, with .gpu/embedded-ft carried:
#   bash offline/gpu/embedded_finetune_loso.sh
#
# Writes OUT/loso-ftN.json and .log per value of LAYERS (the table, the summary figures), and
# OUT/folds.tar: the finished folds. Put that file into .gpu/embedded-ft/ and run again to
# continue a run the budget cut short; finished folds are not trained again.
# Settings (environment): LAYERS ("6 2": top-N layers fine-tuned, one table each, in turn),
# RULE (validation | out-of-source; the latter ~10x the fits), EPOCHS (3), BUDGET_S (540:
# each run is stopped, its finished folds kept, so the call ends inside the tool's 600 s),
# DEVICE (cuda), PACK (.gpu/embedded-ft), OUT (the device tool sets it).
set -uo pipefail
PACK=${PACK:-.gpu/embedded-ft}
OUT=${OUT:-/tmp/embedded-ft-out}
CKPT=${CKPT:-/tmp/embedded-ft-ckpt}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT" "$CKPT"
[ -f "$PACK/responses.jsonl.gz" ] || { echo "no $PACK: run offline.embedded_finetune_pack first"; exit 2; }
[ -f "$PACK/folds.tar" ] && tar -xf "$PACK/folds.tar" -C "$CKPT"
if ! python3 -c "import pydantic" 2>/dev/null; then  # a bare PyTorch image lacks it
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$PACK"/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
command -v nvidia-smi >/dev/null && nvidia-smi -L
started=$SECONDS
for N in ${LAYERS:-6 2}; do
  left=$((BUDGET_S - (SECONDS - started)))
  if [ "$left" -lt 60 ]; then echo "budget spent: not starting --finetune-layers $N"; break; fi
  echo "== --finetune-layers $N (at most ${left}s)"
  timeout "$left" python3 -m offline.embedded_loso --records "$PACK/responses.jsonl.gz" \
    --encoder "$PACK/encoder" --finetune-layers "$N" --device "${DEVICE:-cuda}" --threads 8 \
    --epochs "${EPOCHS:-3}" --threshold-rule "${RULE:-validation}" --checkpoint-dir "$CKPT" \
    --out "$OUT/loso-ft$N.json" 2>&1 | tee "$OUT/loso-ft$N.log"
  echo "== --finetune-layers $N: exit ${PIPESTATUS[0]} after $((SECONDS - started))s"
  (cd "$CKPT" && tar -cf "$OUT/folds.tar" --exclude='*.pt' --exclude='*.tmp' .)
done
