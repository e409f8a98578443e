#!/usr/bin/env bash
# Builds .carry/ (git-ignored) for a session lent a GPU machine (scripts/device-check.sh; README "Speed"):
#   .carry/wheels/  what the GPU image lacks for `bench perf` and `bench eval`: pyautoattack, rebuilt without its
#                   examples/ folder (a 44 MB checkpoint, beyond what a call carries), for Python 3.12
#   .carry/cifar10-jpeg.tar.gz   ../shared/data's CIFAR-10 (never committed)
# The image's own packages (KINDS.md of the device tool: torch, torchvision, numpy, pillow, click, tqdm, safetensors,
# ...) are used as they are. Needs pip's index (PyPI) here; nothing is fetched on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
C=.carry
rm -rf "$C/wheels"  # one version of each wheel: the GPU side installs .carry/wheels/*.whl
mkdir -p "$C/wheels"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d "$tmp" "pyautoattack==0.2.0"
whl=$(ls "$tmp"/pyautoattack-*.whl)
python3 scripts/strip_wheel.py "$whl" "$C/wheels" examples
rm -f "$C/cifar10-jpeg.tar.gz"  # the copy keeps the source's read-only mode
cp ../shared/data/cifar10-jpeg.tar.gz "$C/"
du -sh "$C"
