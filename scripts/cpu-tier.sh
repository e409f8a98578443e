#!/usr/bin/env bash
# The CPU tier (bench/configs/cpu.toml) in the order that makes partial results useful first: seed 0 of the AFT
# core (natural, vAFT, AFKD, ARREST, AFD), PGD-AT and RiFT right after it (its PGD-AT base is that run: weights are not
# committed, so a base and what fine-tunes from it are best trained in one sitting), the rest of the from-scratch
# family (TRADES, the dearest, last), seed 1 of the AFT core, the ablation variants (they need natural s0's weights:
# where a clone lacks them they are trained again and used only if they are the evaluated model), seed 2, then AFD's Fig. 4 grid (seed 0, one of α, β, γ at ½ and
# 2× its default, the others at theirs; Clean and PGD-20 only: the all-default seed-0 run is each curve's middle). Every `bench run` skips finished runs and
# resumes partial ones, so running this again after an interruption carries on where it stopped.
#
#   setsid nohup nice -n 19 scripts/cpu-tier.sh > .tier/log 2>&1 &        # in the background, at low priority
#
# DATA (default ../shared/data/cifar10-jpeg.tar.gz) and RESULTS (default results: yours, git-ignored) may be set in
# the environment; the project's shipped tier is RESULTS=results/reference (maintainers only).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
RESULTS=${RESULTS:-results}
[ -x .venv/bin/bench ] && PATH="$PWD/.venv/bin:$PATH"
run() { echo "=== $(date -u +%FT%TZ) bench run --preset cpu $*"; bench run --preset cpu --data-dir "$DATA" --results "$RESULTS" -q "$@"; }
run --methods natural,vaft,afkd,arrest,afd --seeds 0
run --methods pgd-at --seeds 0
run --methods rift --seeds 0
run --methods fgsm-rs,free-at,atas,fgsm-ga,trades --seeds 0
run --methods natural,vaft,afkd,arrest,afd --seeds 1
run --methods afd-literal,vaft+d,vaft+a --seeds 0
run --methods natural,vaft,afkd,arrest,afd --seeds 2
for hp in alpha=0.025,0.1 beta=0.125,0.5 gamma=12.5,50; do
    run --methods afd --seeds 0 --attacks clean,pgd20 --set "afd.$hp"
done
echo "=== $(date -u +%FT%TZ) the CPU tier is complete"
