#!/usr/bin/env bash
# Carry NVIDIA DALI to the GPU machine, which has Python 3.12 and no network (issue 4's GPU figures).
#
# One `run` call carries 64 MiB of ignored files, and a machine idle for 30 s is given back with its /tmp,
# so every part costs a call back to back with the next. The wheels are 257 MB (5 parts). Installed here
# for the device's Python instead, with the extension modules of the six other Pythons the DALI wheel
# ships removed (73 MB of identical-but-for-the-ABI copies), and packed with xz, they are 187 MB: 3 parts.
#   here:   bash bench/dali_wheels.sh download      # .whl/, .whl-site/ and .whl-parts/ (all git-ignored)
#   device, one `run` call per part, back to back, each with carry=[the part, ".whl-parts/dali-site.sha256"]:
#           bash bench/dali_wheels.sh stash .whl-parts/dali-site.tar.xz.part-aa      (then -ab)
#   device, the last part's call, which installs and measures in the same breath (about 4 minutes):
#           bash bench/dali_wheels.sh stash .whl-parts/dali-site.tar.xz.part-ac && bash bench/dali_wheels.sh
#           install && PARTS=loader,step256 PYTHON=python3 bash bench/gpu_check.sh
#   The last part is 61.5 MB and the working tree about 3 MB, under the 64 MiB a call carries.
# bench/gpu_check.sh adds /tmp/dali-site to PYTHONPATH by itself when it is there.
# PYVER (default 3.12, the device's) picks the Python to pack for; PYVER=3.11 packs for this machine,
# which is how the trimmed site is checked here before device time is spent on it.
set -euo pipefail
cd "$(dirname "$0")/.."
STASH=/tmp/dali-parts
SITE=${DALI_SITE:-/tmp/dali-site}
PY=${PYTHON:-python3}
PYVER=${PYVER:-3.12}
ABI="cpython-${PYVER/./}"

# The versions this project tests with on CPU (pip list of the dev venv); the GPU image already has
# numpy, six and packaging, and CUDA's runtime libraries come with its torch.
WHEELS=(
  nvidia-dali-cuda130==2.4.0 nvidia-libnvcomp-cu13==5.3.0.16 nvidia-nvimgcodec-cu13==0.9.0.20
  nvidia-nvjpeg==13.3.2.43 nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82
  astunparse==1.6.3 gast==0.7.0 libcst==1.9.0 makefun==1.16.0 nvtx==0.2.17 optree==0.20.0
)
PLATFORM=(--only-binary=:all: --python-version "$PYVER" --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)

case "${1:-}" in
  download)
    rm -rf .whl .whl-site .whl-parts && mkdir -p .whl .whl-parts
    python3 -m pip download -q --no-deps "${PLATFORM[@]}" -d .whl "${WHEELS[@]}"
    python3 -m pip install -q --no-deps --no-compile "${PLATFORM[@]}" --target .whl-site .whl/*.whl
    # Extension modules built for another Python (DALI ships one per version, 3.10 to 3.15t) never load.
    find .whl-site -name '*.cpython-3*.so' ! -name "*.$ABI-*" -delete
    tar -cf - -C .whl-site . | xz -T0 -6 > .whl-parts/dali-site.tar.xz
    (cd .whl-parts && sha256sum dali-site.tar.xz > dali-site.sha256 \
      && split -b 60M dali-site.tar.xz dali-site.tar.xz.part- && rm dali-site.tar.xz)
    ls -l .whl-parts
    ;;
  stash)
    part="${2:?which part: .whl-parts/dali-site.tar.xz.part-XX}"
    mkdir -p "$STASH"
    cp "$part" "$STASH/"
    [ -f .whl-parts/dali-site.sha256 ] && cp .whl-parts/dali-site.sha256 "$STASH/"
    ls -l "$STASH"
    ;;
  install)
    cat "$STASH"/dali-site.tar.xz.part-* > "$STASH/dali-site.tar.xz"
    (cd "$STASH" && sha256sum -c dali-site.sha256)
    rm -rf "$SITE" && mkdir -p "$SITE"
    python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='tar')" \
      "$STASH/dali-site.tar.xz" "$SITE"
    rm -f "$STASH"/dali-site.tar.xz*
    # Several of these wheels ship nvidia/__init__.py, so with $SITE on PYTHONPATH the `nvidia` package is
    # this folder's (torch finds its CUDA libraries by path, not by importing nvidia.*). Check the import
    # the loader needs, plugin included, before spending device time on the figures.
    PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
      "import nvidia.dali as d, nvidia.dali.plugin.pytorch, torch; print('DALI', d.__version__, 'from', d.__file__, 'torch', torch.__version__)"
    ;;
  *)
    echo "usage: bash bench/dali_wheels.sh download | stash PART | install" >&2
    exit 2
    ;;
esac
