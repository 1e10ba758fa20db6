#!/usr/bin/env bash
# Carry NVIDIA DALI to the GPU machine, which has Python 3.12 and no network (issue 4's GPU figures).
#
# The wheels are about 257 MB and one `run` call carries 64 MiB of ignored files, so they travel as
# 60 MiB parts, one per call, back to back (a machine idle for 30 s is given back and loses /tmp):
#   here:   bash bench/dali_wheels.sh download      # .whl/ and .whl-parts/ (both git-ignored)
#   device: bash bench/dali_wheels.sh stash .whl-parts/dali.tar.part-aa   (run with carry=[that part];
#           one call per part, in order)
#   device: bash bench/dali_wheels.sh install        (in the call after the last part, or that same call)
#           then: export PYTHONPATH=/tmp/dali-site:$PYTHONPATH before bench/gpu_check.sh
# bench/gpu_check.sh adds /tmp/dali-site to PYTHONPATH by itself when it is there.
set -euo pipefail
cd "$(dirname "$0")/.."
STASH=/tmp/dali-parts
SITE=/tmp/dali-site

# The versions this project tests with on CPU (pip list of the dev venv); the GPU image already has
# numpy, six and packaging, and CUDA's runtime libraries come with its torch.
WHEELS=(
  nvidia-dali-cuda130==2.4.0 nvidia-libnvcomp-cu13==5.3.0.16 nvidia-nvimgcodec-cu13==0.9.0.20
  nvidia-nvjpeg==13.3.2.43 nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82
  astunparse==1.6.3 gast==0.7.0 libcst==1.9.0 makefun==1.16.0 nvtx==0.2.17 optree==0.20.0
)

case "${1:-}" in
  download)
    rm -rf .whl .whl-parts && mkdir -p .whl .whl-parts
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
    tar -cf .whl-parts/dali.tar -C .whl .
    (cd .whl-parts && sha256sum dali.tar > dali.tar.sha256 && split -b 60M dali.tar dali.tar.part- && rm dali.tar)
    ls -l .whl-parts
    ;;
  stash)
    part="${2:?which part: .whl-parts/dali.tar.part-XX}"
    mkdir -p "$STASH"
    cp "$part" "$STASH/"
    [ -f .whl-parts/dali.tar.sha256 ] && cp .whl-parts/dali.tar.sha256 "$STASH/"
    ls -l "$STASH"
    ;;
  install)
    cat "$STASH"/dali.tar.part-* > "$STASH/dali.tar"
    (cd "$STASH" && sha256sum -c dali.tar.sha256)
    mkdir -p "$STASH/wheels" && tar -xf "$STASH/dali.tar" -C "$STASH/wheels"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$STASH"/wheels/*.whl
    # Several of these wheels ship nvidia/__init__.py, so with $SITE on PYTHONPATH the `nvidia` package is
    # this folder's (torch finds its CUDA libraries by path, not by importing nvidia.*). Check the import
    # the loader needs, plugin included, before spending device time on the figures.
    PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" python3 -c \
      "import nvidia.dali as d, nvidia.dali.plugin.pytorch, torch; print('DALI', d.__version__, 'torch', torch.__version__)"
    ;;
  *)
    echo "usage: bash bench/dali_wheels.sh download | stash PART | install" >&2
    exit 2
    ;;
esac
