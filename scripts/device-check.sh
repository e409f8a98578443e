#!/usr/bin/env bash
# The GPU check for a session lent a device machine: ONE call that fits the lent 15 device-minutes with margin and
# leaves a useful record whatever stage it reaches. Here first: scripts/make-carry.sh (builds the git-ignored .carry/),
# then one call of the device tool with `carry: [".carry"]`, `timeout_s` about BUDGET_S + 60:
#
#   scripts/device-check.sh            # every stage in order, inside BUDGET_S seconds (default 480)
#   scripts/device-check.sh perf|aa    # one stage alone (a rerun of what a first call did not reach)
#
# Stages, in order (each under `timeout` of what is left of the budget; after each, $OUT/summary.md says what ran,
# its exit status and seconds, so a call cut short still brings back what was measured):
#   env    torch / CUDA / GPU names                                           -> $OUT/device.txt       (seconds)
#   perf   bench perf at the GPU sizes (ResNet-18, batch 128): natural, pgd-at, then trades, afd, as two records
#          (a record is written at the end of its `bench perf`)              -> $OUT/perf/            (est. 2 × 2-3 min)
#   aa     PGD-AT ResNet-18 on the full CIFAR-10 for $EPOCHS epochs (bf16, compile, channels_last), then clean and
#          PGD-20 on $EVAL_N test images and AutoAttack on $AA_N             -> $OUT/aa/<run>/        (the rest)
# Expected GPU times are estimates from the CPU dry run's structure (compile warm-up dominates the perf stage),
# not measurements: no GPU had been lent when this was written. A dry run on a 2-core CPU (the settings below)
# took 253 s on a 2-core Intel Xeon busy with other work (2026-12-03): env 2 s, perf 68 s + 106 s, aa 77 s.
#
# The aa run lives in results/device-check/ (git-ignored): a machine still warm from an earlier call resumes it
# (training from its checkpoint, AutoAttack from its finished chunks); a fresh one starts it again.
# Environment (defaults for the GPU): BUDGET_S (480), DEVICE (auto), ARCH (resnet18), EPOCHS (3), EVAL_N (10000),
# AA_N (1000), DATA (.carry/cifar10-jpeg.tar.gz), PERF_ARGS (extra `bench perf` options), PYTHON (python3), OUT.
# CPU dry run:
#   DATA=../shared/data/cifar10-jpeg.tar.gz OUT=/tmp/dc DEVICE=cpu ARCH=smallcnn EPOCHS=1 SUBSET=10 EVAL_N=32 AA_N=8 BUDGET_S=400 \
#       PERF_ARGS="--steps 1 --repeats 1 --aa-n 2 --eval-n 16" PYTHON=.venv/bin/python scripts/device-check.sh
set -uo pipefail
stage=${1:-all}
case $stage in all|perf|aa) ;; *) echo "usage: scripts/device-check.sh [all|perf|aa] (got '${stage}')" >&2; exit 2;; esac
OUT=$(realpath -m "${OUT:-/tmp/device-check-out}")  # before the cd: a relative OUT is the caller's
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
mkdir -p "$OUT" || exit 1
export PYTHONUNBUFFERED=1
START=$(date +%s)
BUDGET=${BUDGET_S:-480}
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
summary() {  # stage, exit status, seconds: appended after every stage
    [ -f "$OUT/summary.md" ] || printf '| stage | exit | seconds | note |\n|---|---|---|---|\n' > "$OUT/summary.md"
    printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "${4:-}" >> "$OUT/summary.md"
}
run_stage() {  # name, command...: under timeout of what is left; skipped when under 30 s are left
    local name=$1; shift
    local t=$(left)
    if [ "$t" -lt 30 ]; then summary "$name" skipped 0 "budget spent"; return 0; fi
    local t0=$(date +%s)
    timeout --signal=INT --kill-after=15 "$t" "$@"
    local rc=$?
    local note=""; [ "$rc" = 124 ] && note="stopped at the budget (resumable)"
    summary "$name" "$rc" $(( $(date +%s) - t0 )) "$note"
    return 0
}
if ! $PY -c "import pyautoattack" 2>/dev/null; then
    [ -d .carry/wheels ] || { echo "no .carry/wheels: run scripts/make-carry.sh here and carry .carry" >&2; exit 2; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/wheels/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
t0=$(date +%s)
{ date -u; nvidia-smi -L 2>/dev/null; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"; } > "$OUT/device.txt"
cat "$OUT/device.txt"
summary env 0 $(( $(date +%s) - t0 ))
DEVICE=${DEVICE:-auto}

perf() {
    # shellcheck disable=SC2086
    run_stage "perf natural,pgd-at" $PY -m bench perf --device "$DEVICE" --out "$OUT/perf" -m natural,pgd-at \
        --label a ${PERF_ARGS:-} 2>&1 | tee -a "$OUT/perf.log"
    # shellcheck disable=SC2086
    run_stage "perf trades,afd" $PY -m bench perf --device "$DEVICE" --out "$OUT/perf" -m trades,afd \
        --label b ${PERF_ARGS:-} 2>&1 | tee -a "$OUT/perf.log"
}

aa() {
    local res=results/device-check
    # shellcheck disable=SC2086
    run_stage "aa (pgd-at ${ARCH:-resnet18}, ${EPOCHS:-3} epochs)" $PY -m bench run -m pgd-at -d cifar10 \
        -a "${ARCH:-resnet18}" --data-dir "${DATA:-.carry/cifar10-jpeg.tar.gz}" --epochs "${EPOCHS:-3}" \
        ${SUBSET:+--subset "$SUBSET"} --precision bf16 --compile --channels-last --attacks clean,pgd20,aa \
        --eval-n "${EVAL_N:-10000}" --aa-n "${AA_N:-1000}" --device "$DEVICE" --results "$res" -q \
        2>&1 | tee -a "$OUT/aa.log"
    for run in "$res"/runs/*/; do  # $OUT/aa/<run>/<file>: two folders down, as the device tool brings back
        [ -d "$run" ] || continue
        dst="$OUT/aa/$(basename "$run")"
        mkdir -p "$dst" || exit 1
        for f in config.json metrics.jsonl eval.json; do [ -f "$run$f" ] && cp "$run$f" "$dst/"; done
    done
}

case $stage in
all) perf; aa ;;
perf) perf ;;
aa) aa ;;
esac
cat "$OUT/summary.md"
