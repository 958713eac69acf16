#!/bin/bash
# The device call's command (a lent GPU machine; see prepare.sh): the carried packages installed, then each step
# bounded by its own limit, its output kept under $OUT as it goes (at most 8 files come back). Budget: ~9 of the
# call's 10 minutes (jpeg 60 s, gil 150, masks 60, pipeline 240, scaling 190, parity 70: more than one call holds,
# so the first call takes STEPS="jpeg gil pipeline" and the second the rest); the steps run in order of value. STEPS (env) picks a subset, e.g. STEPS="pipeline parity".
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD YOLO_OFFLINE=1 ORT_DISABLE_TELEMETRY=1 PATH=$PWD/.whl/redis:$PATH
T0=$(date +%s)
mark() { echo "=== $1 at +$(( $(date +%s) - T0 ))s"; }
wants() { [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $1 "* ]]; }
mark install
mkdir -p /tmp/site && tar -xJf .whl/site.tar.xz -C /tmp/site  # the packages prepare.sh unpacked there
# `detseg track`'s module imports PyAV (35 MB of wheel); the benchmarks decode no video.
mkdir -p /tmp/site/av && echo "# placeholder: no video is decoded on the device run" > /tmp/site/av/__init__.py
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, numpy, cv2; print('torch', torch.__version__, 'numpy', numpy.__version__, 'cv2', cv2.__version__)"
python3 -c "import torchcodec.decoders" || { echo "TorchCodec does not load with this torch"; exit 5; }
python3 -c "import service.cli.serve, tests.benchmarks.jpeg_bench, tests.benchmarks.gil_bench, tests.benchmarks.pipeline_bench, tests.benchmarks.scaling_bench, tests.benchmarks.device_mask_bench" || exit 3
redis-server --version >/dev/null || exit 4
mkdir -p "$OUT/pipe" "$OUT/scal"
if wants jpeg; then
  mark jpeg  # JPEG decode: Pillow vs TorchCodec on the host vs nvJPEG (one image, and batched), pixels vs Pillow's
  timeout "${JPEG_S:-60}" python3 -m tests.benchmarks.jpeg_bench --device cuda --threads 8 --out "$OUT" 2>&1 | tail -3
  echo "rc=${PIPESTATUS[0]}"; rm -f "$OUT/JPEG.md"  # its rows are in jpeg.json; a log would be a ninth file
fi
if wants gil; then
  mark gil  # GIL switch interval 5 vs 0.5 ms: the convoy micro-benchmark, and one process's throughput at 1/4/8 clients
  timeout "${GIL_S:-150}" python3 -m tests.benchmarks.gil_bench --device cuda --backend torch --models bench \
    --intervals 5,0.5 --rounds 2 --out "$OUT" 2>&1 | grep -v "^{" | tail -3
  echo "rc=${PIPESTATUS[0]}"; rm -f "$OUT/GIL.md"  # its rows are in gil.json
fi
if wants masks; then
  mark masks  # the mask stage on the device's logits: every mask at once vs mask by mask vs the host path
  timeout "${MASK_S:-60}" python3 -m tests.benchmarks.device_mask_bench --device cuda --out "$OUT" > "$OUT/masks.log" 2>&1
  echo "rc=$?"
fi
if wants pipeline; then
  mark pipeline  # single image, throughput (one process, then --workers 4), re-prompt, precision gate, decoder
  timeout "${PIPE_S:-240}" python3 -m tests.benchmarks.pipeline_bench --device cuda --backends embedded \
    --rss-requests 0 --repeats 10 --workers "${PIPE_WORKERS:-4}" --out "$OUT/pipe" > "$OUT/pipe.log" 2>&1
  echo "rc=$?"; rm -f "$OUT/pipe/RESULTS.md"  # at most 8 files come back: reports are written here from the JSON
fi
if wants scaling; then
  mark scaling  # image size, boxes, the 12 MP x 200 corner, clients x workers 1,2,4 (a channel per client)
  timeout "${SCAL_S:-190}" python3 -m tests.benchmarks.scaling_bench --device cuda --backend torch \
    --workers "${SCAL_WORKERS:-1,2,4}" --out "$OUT/scal" > "$OUT/scal.log" 2>&1
  echo "rc=$?"; rm -f "$OUT/scal/SCALING.md" "$OUT/scal/scaling.png"
fi
if wants parity; then
  mark parity
  DETSEG_TEST_DEVICE=cuda DETSEG_TEST_PRECISION=fp32 DETSEG_TEST_TEXT_ENCODER=none timeout "${TEST_S:-70}" \
    python3 -m pytest -q -p no:cacheprovider tests/integration/test_device_resident.py \
    tests/integration/test_parity.py > "$OUT/parity.log" 2>&1
  echo "rc=$?"; tail -5 "$OUT/parity.log"
fi
mark done
