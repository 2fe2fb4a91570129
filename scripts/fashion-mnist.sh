#!/usr/bin/env bash
# Makes sure the Fashion-MNIST IDX files are on disk: Debian's dataset-fashion-mnist
# package when we are root with apt, otherwise say how to get them.
set -uo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[data] installing Debian's dataset-fashion-mnist" >&2
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }) \
    && exit 0
fi
cat >&2 <<MSG
[data] Fashion-MNIST is not in $dir and could not be installed with apt.
       On Debian/Ubuntu as root: apt-get install dataset-fashion-mnist
       Otherwise pass --data-root DIR --download to 'gex compare' so that torchvision
       downloads it into DIR (needs internet), or put the four *-ubyte(.gz) files in DIR.
MSG
exit 1
