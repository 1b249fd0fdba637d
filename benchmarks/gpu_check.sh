#!/usr/bin/env bash
# The GPU checks, in one call of a lent device machine (no registry there): install the
# wheels carried in .whl/ (dask, distributed, zarr, dask-cuda and what they need beyond the
# machine's image; see README "GPU"), then run
#   1. the gpu tests (every quantizer kind on CuPy, CuPy-backed compressions, the planner);
#   2. quantize/dequantize throughput per kind on the GPU;
#   3. compress on CuPy blocks, default kinds against minmax;
#   4. the demo on a dask-cuda LocalCUDACluster (tiles on the GPU: --device auto);
#   5. the same demo on a LocalCluster of the machine's cores, for comparison.
# Fill .whl/ beforehand on a machine with a package index (Python 3.12, x86-64 wheels):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     dask==2026.8.0 distributed==2026.8.0 zarr==3.1.6 numcodecs==0.16.6 \
#     donfig==0.8.1.post1 google-crc32c==1.9.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2 \
#     zict==3.0.0 tornado==6.6.1 dask-cuda==26.10.0
# (a machine with a package index needs none: pip install -e ".[test,gpu]").
# Logs go to $OUT (or /tmp/gpu-check). Usage: bash benchmarks/gpu_check.sh [STEPS]
# where STEPS is a comma list of 1-5 (default all); DEMO_SHAPE="N D" (default 16384 16384).
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
STEPS=${1:-1,2,3,4,5}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import cupy, dask, zarr, numpy; print('cupy', cupy.__version__, 'dask', dask.__version__, 'zarr', zarr.__version__, 'numpy', numpy.__version__)"
step() { [[ ",$STEPS," == *",$1,"* ]]; }
if step 1; then
    echo "== 1. gpu tests"
    timeout 200 python3 -m pytest -m gpu tests/core/test_gpu.py tests/core/test_single_pass.py \
        -q --tb=short -p no:cacheprovider -W "ignore::DeprecationWarning" >"$OUT/pytest.log" 2>&1
    echo "pytest rc=$?"
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | cut -c1-300 | tail -40
    grep -E "^E  |^lplr_dask.*: in " "$OUT/pytest.log" | cut -c1-200 | sort | uniq -c | sort -rn | head -25
fi
if step 2; then
    echo "== 2. throughput on the GPU"
    timeout 120 python3 benchmarks/bench_quantizers.py --part throughput --device gpu \
        --bits 1,2,3,4,8 --repeat 5 2>&1 | tee "$OUT/throughput.log" | tail -30
fi
if step 3; then
    echo "== 3. compress on CuPy blocks, default kinds vs minmax"
    timeout 120 python3 benchmarks/bench_quantizers.py --part speed --device gpu \
        --speed-size ${SPEED_SIZE:-16384x8192} --repeat 3 2>&1 | tee "$OUT/speed.log" | tail -6
fi
SHAPE=${DEMO_SHAPE:-16384 16384}
if step 4; then
    echo "== 4. demo $SHAPE on a LocalCUDACluster (tiles on the GPU)"
    timeout 100 python3 -m lplr_dask.cli demo --shape $SHAPE --cluster cuda --no-progress \
        2>&1 | tee "$OUT/demo.log" | tail -6
fi
if step 5; then
    cores=$(nproc)
    echo "== 5. the same demo on a LocalCluster of the $cores cores (tiles on the CPU)"
    timeout 150 python3 -m lplr_dask.cli demo --shape $SHAPE --cluster local --workers 4 \
        --threads $((cores / 4)) --memory-limit 24GiB --no-progress 2>&1 \
        | tee "$OUT/demo_cpu.log" | tail -6
fi
