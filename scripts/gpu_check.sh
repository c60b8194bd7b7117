#!/usr/bin/env bash
# The Triton kernels' GPU check, in one call (issue 15): tests on CUDA, then the benchmark table.
#
#   device tool:  run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
#   elsewhere:    bash scripts/gpu_check.sh            (needs CUDA torch + triton; logs in $OUT or /tmp/gpu_check)
#
# The device machine has torch and triton but no network: Liger-Kernel (the comparison column) travels as
# a wheel. Beforehand, here:  echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel==0.8.5
# Without it the liger column is left out. normkit itself runs from src/ (no install, nothing compiled).
# Budget: about 1 min of tests + 4-6 min of benchmark; timeout_s=540 leaves time to rerun within 15 min.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee -a "$OUT/gpu.txt"

echo "== tests on CUDA" | tee "$OUT/tests.log"
timeout 150 python3 -m pytest tests/test_triton_cuda.py -q -p no:cacheprovider -o addopts= -x 2>&1 | tee -a "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== benchmark" | tee "$OUT/bench.log"
timeout 330 python3 -c "from normkit.cli import main; raise SystemExit(main(['kernels', '--device', 'cuda', \
  '--widths', '256,512,1024,2048,4096,8192,16384,32768', '--dtypes', 'bf16,fp32']))" 2>&1 | tee -a "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc" | tee -a "$OUT/gpu.txt"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
