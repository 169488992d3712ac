#!/usr/bin/env bash
# Issue 14's GPU figures, prepared for a session that is lent the `device` machine (15 min of device time a
# session, 10 min a command): two parts, one call each, every figure as JSON under OUT.
#
#   here, once:    bash benchmarks/gpu_suite.sh wheels          what the device image lacks -> .whl/ (git-ignored)
#   device call 1: bash benchmarks/gpu_suite.sh eager "$OUT"    (carry .whl) fp16 + bf16 at `full`, 50 steps, cfg
#                  7.5, FLOPs counted; fp16 with --offload; the fp16 NaN sweep over 1..100 steps
#   device call 2: bash benchmarks/gpu_suite.sh compile "$OUT"  (carry .whl) the same request under torch.compile
#
# SIZE, DEVICE, STEPS, DTYPES, SWEEP (the sweep's step counts) and PYTHON override the defaults (the tests run the eager part at
# SIZE=tiny DEVICE=cpu). The `full` checkpoint is made with random weights on the device machine on first use.
set -euo pipefail

part=${1:?usage: bash benchmarks/gpu_suite.sh wheels|eager|compile [OUT]}
size=${SIZE:-full}
device=${DEVICE:-cuda}
steps=${STEPS:-50}
dtypes=${DTYPES:-float16,bfloat16}
python=${PYTHON:-python3}
cd "$(dirname "$0")/.."

# the model path's imports that the device image (Python 3.12, torch 2.11) does not hold, pinned as tested here
wheels="open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 pydantic==2.14.4 pydantic_core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5"
if [ "$part" = wheels ]; then
    # shellcheck disable=SC2086
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $wheels
    ls -l .whl
    exit 0
fi

out=${2:?usage: bash benchmarks/gpu_suite.sh eager|compile OUT}
mkdir -p "$out"
if ! "$python" -c "import open_clip, pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ date -u; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; "$python" -c "import torch; print(torch.__version__)"; } \
    >"$out/machine.txt" 2>&1

case $part in
    eager)
        "$python" -m benchmarks.run --size "$size" --device "$device" --dtype "$dtypes" --steps "$steps" \
            --no-baseline --out "$out/eager.json"
        "$python" -m benchmarks.run --size "$size" --device "$device" --dtype "${dtypes%%,*}" --steps "$steps" \
            --offload --no-baseline --no-flops --out "$out/offload.json"
        "$python" -m benchmarks.nan_sweep --size "$size" --device "$device" --dtype float16 ${SWEEP:+--steps "$SWEEP"} \
            --out "$out/nan_sweep.json"
        ;;
    compile)
        "$python" -m benchmarks.run --size "$size" --device "$device" --dtype "$dtypes" --steps "$steps" \
            --compile --no-baseline --no-flops --out "$out/compile.json"
        ;;
    *)
        echo "unknown part $part (wheels, eager or compile)" >&2
        exit 2
        ;;
esac
