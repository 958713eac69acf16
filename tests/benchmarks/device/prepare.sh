#!/bin/bash
# Run HERE (not on the device), from the repository root, before a lent GPU session's device call:
#   bash tests/benchmarks/device/prepare.sh
# Fills the ignored folder .whl/ with what the device machine's image lacks (measured on a lent H200, 2026-12-04:
# it has torch, torchvision, numpy, OpenCV, grpcio, pandas, scipy, pytest, ... but not the packages below): the
# CPython 3.12 wheels pinned to this venv's versions and copies of the sdist-only packages, unpacked into one site
# folder carried as site.tar.xz, and Debian's redis-server with the two libraries that image lacks (the workers'
# shared tier). Then the device call is
#   run(command="bash tests/benchmarks/device/run.sh", carry=[".whl", "service/proto"], timeout_s=...)
# The tree plus .whl must stay under the device tool's 64 MiB = 67.1 MB (session 29: 42.0 + 24.6 MB, TorchCodec's
# image decoders included; grpcio-tools is not carried: nothing there runs protoc). TorchCodec 0.16's release notes say
# torch >= 2.11, the H200 image's torch; 0.17 with 2.11 is not yet tried.
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=.venv/bin/python
SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.whl/" >> .git/info/exclude; }
rm -rf .whl && mkdir -p .whl/site .whl/redis
WHEELS="cryptography cffi defusedxml googleapis-common-protos grpcio grpcio-health-checking grpcio-reflection
hydra-core omegaconf opentelemetry-api opentelemetry-exporter-otlp-proto-common
opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-prometheus opentelemetry-proto opentelemetry-sdk
opentelemetry-semantic-conventions openvino-telemetry pycocotools pydot redis protobuf ultralytics pytest-timeout
pytest-asyncio torchcodec"
PLATFORMS="--platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
--platform manylinux2014_x86_64 --platform any"
for name in $WHEELS; do
  version=$($PY -c "import importlib.metadata as m; print(m.version('$name'))")
  # shellcheck disable=SC2086
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d .whl "$name==$version" 2>/dev/null || { echo "no cp312 wheel for $name==$version" >&2; exit 1; }
done
# sdist-only on PyPI (pure Python): copied from this venv.
for pkg in sam2 iopath antlr4; do cp -r "$SITE/$pkg" .whl/site/; done
# Every wheel unpacked beside them (what pip does for these: none has a .data folder), TorchCodec without the
# FFmpeg-version libraries that decode video (no benchmark does; its image decoders need none of them), and the
# whole site folder carried as one xz tarball: 16.6 MB where the wheels took 32 (xz packs libraries tighter than
# the wheels' deflate). run.sh unpacks it to /tmp/site.
for w in .whl/*.whl; do $PY -m zipfile -e "$w" .whl/site; done
rm -f .whl/*.whl .whl/site/torchcodec/libtorchcodec_core*.so .whl/site/torchcodec/libtorchcodec_custom_ops*.so \
  .whl/site/torchcodec/libtorchcodec_heic.so
find .whl/site -name __pycache__ -prune -exec rm -rf {} +
find .whl/site/torchcodec \( -name "*.cpp" -o -name "*.h" \) -delete
tar -cJf .whl/site.tar.xz -C .whl/site . && rm -rf .whl/site
# redis-server: Debian's binary answers as the server when its name holds "redis-server"; liblzf and libjemalloc
# are the libraries the device image lacks.
command -v redis-server >/dev/null || make redis-tools
cp "$(readlink -f "$(command -v redis-server)")" .whl/redis/redis-server.bin
cp -L /lib/x86_64-linux-gnu/liblzf.so.1 /lib/x86_64-linux-gnu/libjemalloc.so.2 .whl/redis/
printf '#!/bin/sh\nD=$(dirname "$0")\nLD_LIBRARY_PATH=$D${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec "$D/redis-server.bin" "$@"\n' \
  > .whl/redis/redis-server
chmod +x .whl/redis/redis-server
make proto >/dev/null
du -sb .whl | awk '{print $1 / 1e6 " MB in .whl"}'
git ls-files -z | xargs -0 du -cb | tail -1 | awk '{print $1 / 1e6 " MB in the tree (with .whl: under 67.1)"}'
