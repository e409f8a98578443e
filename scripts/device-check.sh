#!/usr/bin/env bash
# The GPU measurements of `bench perf` and of AutoAttack's time (issue 8), as one prepared command per stage for a
# session lent a device machine. Here first: scripts/make-carry.sh (builds the git-ignored .carry/). Then, with the
# device tool, `carry: [".carry"]`, one stage per call (each well inside a call's 10 minutes on an H200):
#   scripts/device-check.sh perf      bench perf at the GPU sizes (ResNet-18, batch 128); ABLATE=1 adds the fused
#                                     attack step's ablation (a third pipeline: more minutes)  -> $OUT/perf/
#   scripts/device-check.sh science   the same with --science (PGD-AT fp32 / bf16 / compiled) -> $OUT/perf/
#   scripts/device-check.sh aa        PGD-AT ResNet-18 on CIFAR-10 for $EPOCHS epochs (bf16, compile, channels_last),
#                                     then clean, PGD-20 and AutoAttack on $AA_N test images  -> $OUT/aa/
# The aa run lives in results/device-check/ (git-ignored): on a machine still warm from the last call it resumes
# (training from its checkpoint, AutoAttack from its finished chunks); a fresh machine starts it again. `bench perf`
# writes its record at the end only: where a stage might outlast the call, split it (PERF_ARGS="-m natural,pgd-at",
# then "-m trades,afd" with --label).
# Environment (defaults for the GPU; a CPU dry run sets smaller ones): DEVICE (auto), ARCH (resnet18), EPOCHS (10),
# EVAL_N (10000), AA_N (2000), PERF_ARGS (extra `bench perf` options), PYTHON (python3). CPU dry runs (minutes):
#   OUT=/tmp/dc DEVICE=cpu ARCH=smallcnn EPOCHS=1 SUBSET=10 EVAL_N=32 AA_N=8 PYTHON=.venv/bin/python \
#       scripts/device-check.sh aa
#   OUT=/tmp/dc DEVICE=cpu PERF_ARGS="--steps 1 --repeats 1 -m natural --aa-n 2" PYTHON=.venv/bin/python \
#       scripts/device-check.sh perf
set -uo pipefail
stage=${1:-}
case $stage in perf|science|aa) ;; *) echo "usage: scripts/device-check.sh perf|science|aa (got '${stage}')" >&2; exit 2;; esac
OUT=$(realpath -m "${OUT:-/tmp/device-check-out}")  # before the cd: a relative OUT is the caller's
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
mkdir -p "$OUT" || exit 1
export PYTHONUNBUFFERED=1
if ! $PY -c "import pyautoattack" 2>/dev/null; then
    [ -d .carry/wheels ] || { echo "no .carry/wheels: run scripts/make-carry.sh here and carry .carry" >&2; exit 2; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/wheels/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ date -u; nvidia-smi -L 2>/dev/null; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"; } > "$OUT/device.txt"
cat "$OUT/device.txt"
DEVICE=${DEVICE:-auto}
case $stage in
perf|science)
    extra=""; [ "$stage" = science ] && extra="--science"
    [ "$stage" = perf ] && [ "${ABLATE:-0}" = 1 ] && extra="--ablate-fused-step"
    # shellcheck disable=SC2086
    $PY -m bench perf --device "$DEVICE" --out "$OUT/perf" $extra ${PERF_ARGS:-} 2>&1 | tee "$OUT/perf.log"
    exit "${PIPESTATUS[0]}" ;;
aa)
    res=results/device-check
    $PY -m bench run -m pgd-at -d cifar10 -a "${ARCH:-resnet18}" --data-dir .carry/cifar10-jpeg.tar.gz \
        --epochs "${EPOCHS:-10}" ${SUBSET:+--subset "$SUBSET"} --precision bf16 --compile --channels-last \
        --attacks clean,pgd20,aa --eval-n "${EVAL_N:-10000}" --aa-n "${AA_N:-2000}" --device "$DEVICE" \
        --results "$res" -q 2>&1 | tee "$OUT/aa.log"
    rc=${PIPESTATUS[0]}
    for run in "$res"/runs/*/; do  # $OUT/aa/<run>/<file>: two folders down, as the device tool brings back
        [ -d "$run" ] || continue
        dst="$OUT/aa/$(basename "$run")"
        mkdir -p "$dst" || exit 1
        for f in config.json metrics.jsonl eval.json; do [ -f "$run$f" ] && cp "$run$f" "$dst/"; done
    done
    exit "$rc" ;;
esac
