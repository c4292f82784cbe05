#!/usr/bin/env bash
# The GPU checks of issue 14 in one run of at most BUDGET_S seconds (480 by default), every result in one folder.
#
#   bash bench/gpu_check.sh [OUT_DIR]              # on a CUDA machine; OUT_DIR defaults to $OUT, else bench_out/<time>
#   bash bench/gpu_check.sh --dry-run [OUT_DIR]    # the same parts on the CPU with tiny sizes (also: DRY_RUN=1)
#
# Each part (env, synth, cuda_tests, run_device, run_cpu, throughput, loss_scaling, throughput_compile) runs under a
# `timeout` capped by what is left of the budget, its output in <part>.log; summary.txt lists their outcomes and the
# headline numbers; exit status 0 when none failed or timed out. What each runs and why: docs/BENCHMARKS.md.
# Environment: OUT, DRY_RUN=1, BUDGET_S, PYTHON, DATA_DIR (synthetic data and checkpoints; default bench_data).
set -u
cd "$(dirname "$0")/.." || exit 1
die() { echo "error: $*" >&2; exit 2; }

DRY_RUN=${DRY_RUN:-0}
OUT_ARG=""
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    -*) die "unknown option $arg: use --dry-run, --help or an output folder" ;;
    *) OUT_ARG=$arg ;;
  esac
done
OUT=${OUT_ARG:-${OUT:-bench_out/$(date +%Y-%m-%d_%H-%M-%S)}}
mkdir -p "$OUT" && OUT=$(realpath "$OUT") || die "cannot create the output folder $OUT"
DATA_DIR=${DATA_DIR:-bench_data}
mkdir -p "$DATA_DIR" && DATA_DIR=$(realpath "$DATA_DIR") || die "cannot create DATA_DIR=$DATA_DIR"
PYTHON=${PYTHON:-python}
export PYTHONUNBUFFERED=1
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-5}  # progress bars in the logs: a line every 5 s, not every step
MIN_PART_S=20    # a part with less time than this left is skipped
RESERVE_S=15     # kept back for the run summaries and summary.txt
declare -A LIMIT=([env]=30 [synth]=120 [cuda_tests]=150 [run]=150 [throughput]=90 [loss_scaling]=100
                  [throughput_compile]=200 [summary]=30)  # seconds on the GPU, twice these in the dry run

if [ "$DRY_RUN" = 1 ]; then
  MODE="dry run on the CPU (tiny sizes: checks the script, not the speed)"
  BUDGET_S=${BUDGET_S:-900}
  DEVICE=cpu
  export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # shared small machines: spinning OpenMP waits stall torch
  SYNTH=(--train 16 --test 8 --unlabeled 32)
  # float32: bfloat16 autocast on a CPU took 6x as long (docs/BENCHMARKS.md); the dry run checks the script
  RUN_SIZE=(dataset.input_shape="(16,16,3)" batch_size=16 log_every_n_steps=1 model.out_dim=32 fp16_precision=false)
  DEVICE_EPOCHS=2
  THROUGHPUT=(--device cpu --crop 32 --batch-size 8 --steps 1 --warmup 1 --workers 1)
  COMPILE=("${THROUGHPUT[@]}" --compile)
  LOSS=(--device cpu --sizes 64 --seed-up-to 64 --repeats 1)
  for part in "${!LIMIT[@]}"; do LIMIT[$part]=$(( 2 * LIMIT[$part] )); done
else
  MODE="GPU run"
  BUDGET_S=${BUDGET_S:-480}
  DEVICE=cuda
  SYNTH=(--train 5000 --test 8000 --unlabeled 100000)     # the real STL10: 105,000 pretraining images
  RUN_SIZE=(fp16_precision=true amp_dtype=bfloat16)       # config.yaml: resnet18, 96 px, batch 512, log every 50 steps
  DEVICE_EPOCHS=3
  THROUGHPUT=(--device cuda)                              # batch 512, bf16, channels_last, 20 steps after 5
  COMPILE=(--device cuda --compile --warmup 10)
  LOSS=(--device cuda --sizes 256 512 1024 2048 4096 8192 16384)
  "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" \
    || die "torch sees no CUDA GPU here: run this on a GPU machine, or add --dry-run for the CPU"
fi
RUN_COMMON=(dataset.name=stl10 dataset.download=false fine_tune_from=None device=$DEVICE seed=0 "${RUN_SIZE[@]}")
PARTS="$OUT/parts.tsv"
: > "$PARTS"
echo "gpu_check: $MODE; output $OUT; data $DATA_DIR; budget ${BUDGET_S} s" | tee "$OUT/progress.log"

# note NAME STATUS LIMIT NOTE [SECONDS]: a line of parts.tsv (and progress.log)
note() {
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "${5:-0}" "$3" "$4" >> "$PARTS"
  echo "-- $1: $2 in ${5:-0} s${4:+ ($4)}" | tee -a "$OUT/progress.log"
}

# run_part [--always] NAME LIMIT COMMAND...: COMMAND under `timeout`, its output in NAME.log, its outcome in
# parts.tsv; the limit is capped by what is left of the budget, except with --always (the seconds-long summaries).
run_part() {
  local start=$SECONDS rc status note="" left=$(( BUDGET_S - SECONDS - RESERVE_S ))
  [ "$1" = --always ] && { left=$3; shift; }  # its own limit: never skipped (LIMIT[summary] >= MIN_PART_S) or cut
  local name=$1 limit=$2
  shift 2
  if [ "$left" -lt "$MIN_PART_S" ]; then
    note "$name" skipped "$limit" "no time left in the ${BUDGET_S} s budget"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "-- $name (limit ${limit} s, at ${SECONDS} s): $*" | tee -a "$OUT/progress.log"
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=passed ;;
    124|137) status="timed out"; note="killed after ${limit} s" ;;
    *) status=failed; note="exit $rc: $(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-160)" ;;
  esac
  note "$name" "$status" "$limit" "$note" "$(( SECONDS - start ))"
  return "$rc"
}

env_info() {
  echo "date: $(date -Is)"; echo "host: $(hostname)"; echo "mode: $MODE"
  if commit=$(git rev-parse HEAD 2> /dev/null); then
    echo "git: $commit$(git diff --quiet HEAD || echo ' (with local changes)')"
  else echo "git: no repository here (a copied working tree): take the commit from the machine that sent it"; fi
  "$PYTHON" -c "import numpy, torch; from bench import describe_machine as machine
print('machine:', machine('cuda' if torch.cuda.is_available() else 'cpu'), '| numpy', numpy.__version__, '| CUDA',
      torch.version.cuda, '| cuDNN', torch.backends.cudnn.version())"
  echo "memory: $(free -g | awk '/^Mem:/ {print $2 " GiB, " $7 " GiB available"}')"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv; nvidia-smi
  else echo "nvidia-smi: not found (no NVIDIA driver here)"; fi
  echo "disks:"; df -hT "$DATA_DIR" "$OUT"
}

# train NAME ROOT OVERRIDES...: run.py into DATA_DIR/runs/NAME with the GPU sampled into OUT/NAME_gpu.csv by
# nvidia-smi, a line per sample (stdbuf: nothing buffered is lost when it is stopped; the file stays empty without
# nvidia-smi). Stopped by its part's timeout, both get SIGTERM: the trainer saves and exits, the sampler stops.
train() {
  local name=$1 root=$2 rc
  shift 2
  command -v nvidia-smi > /dev/null || echo "nvidia-smi not found: the GPU is not sampled"
  stdbuf -oL nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -i 0 \
    -lms 200 > "$OUT/${name}_gpu.csv" 2> /dev/null &
  "$PYTHON" run.py dataset.root="$root" run_dir="$DATA_DIR/runs/$name" "$@"
  rc=$?
  kill -TERM $! 2> /dev/null; wait $!
  return "$rc"
}
export -f env_info train
export MODE PYTHON DATA_DIR OUT

# run_and_summarize NAME TARGETS ROOT OVERRIDES...: the run as one part, then the summary of the steps that
# finished, with the issue's targets checked when TARGETS is "targets".
run_and_summarize() {
  local name=$1 targets=()
  [ "$2" = targets ] && targets=(--target-epoch-seconds 10 --target-busy 90)
  shift 2
  rm -rf "${DATA_DIR:?}/runs/$name" "${OUT:?}/$name"
  run_part "$name" "${LIMIT[run]}" bash -c 'train "$@"' _ "$name" "$@"
  mkdir -p "$OUT/$name"  # the run's records, not its checkpoints, also after a failure or a timeout
  cp "$DATA_DIR/runs/$name"/{config.yaml,meta.jsonl,metrics.jsonl} "$DATA_DIR/runs/$name"/events.out.tfevents.* \
    "$OUT/$name/" 2> /dev/null
  if [ ! -s "$OUT/$name/metrics.jsonl" ]; then
    note "${name}_summary" skipped 0 "no metrics.jsonl: the run logged no step"
    return 1
  fi
  run_part --always "${name}_summary" "${LIMIT[summary]}" "$PYTHON" -m bench.run_summary "$OUT/$name" \
    --gpu-csv "$OUT/${name}_gpu.csv" --json "$OUT/${name}_summary.json" ${targets[@]+"${targets[@]}"}
}

run_part env "${LIMIT[env]}" bash -c env_info
STL10="$DATA_DIR/stl10"
run_part synth "${LIMIT[synth]}" "$PYTHON" -m bench.stl10_synth "$STL10" "${SYNTH[@]}" &  # the tests need no disk
SYNTH_PID=$!
run_part cuda_tests "${LIMIT[cuda_tests]}" "$PYTHON" -m pytest -q -rs -p no:cacheprovider -m cuda \
  --junitxml="$OUT/cuda_tests.xml" tests  # exit 5, a failure, if no test is marked
wait "$SYNTH_PID"
if grep -q "^synth	passed" "$PARTS"; then
  run_and_summarize run_device targets "$STL10" "${RUN_COMMON[@]}" dataset.augment_on=device dataset.valid_size=0 \
    epochs=$DEVICE_EPOCHS
  run_and_summarize run_cpu none "$STL10" "${RUN_COMMON[@]}" dataset.augment_on=cpu dataset.num_workers="$(nproc)" \
    epochs=1
else
  note run_device skipped 0 "no data: synth did not pass"; note run_cpu skipped 0 "no data: synth did not pass"
fi
run_part throughput "${LIMIT[throughput]}" "$PYTHON" -m bench.throughput "${THROUGHPUT[@]}" \
  --output "$OUT/throughput.md"
run_part loss_scaling "${LIMIT[loss_scaling]}" "$PYTHON" -m bench.loss_scaling "${LOSS[@]}" \
  --output "$OUT/loss_scaling.md"
run_part throughput_compile "${LIMIT[throughput_compile]}" "$PYTHON" -m bench.throughput "${COMPILE[@]}" \
  --output "$OUT/throughput_compile.md"

{
  echo "gpu_check: $MODE, $(date -Is), ${SECONDS} s of a ${BUDGET_S} s budget"
  echo "output: $OUT"
  grep -m1 '^machine' "$OUT/env.log"
  grep -m1 -A1 '^name, driver_version' "$OUT/env.log" | tail -n 1
  printf '\n%-20s %-10s %8s %8s  %s\n' part status seconds limit note
  awk -F '\t' '{printf "%-20s %-10s %8s %8s  %s\n", $1, $2, $3, $4, $5}' "$PARTS"
  echo; echo "== cuda_tests"; grep -E 'passed|failed|skipped|error' "$OUT/cuda_tests.log" 2> /dev/null | tail -n 6
  for name in run_device run_cpu; do echo "== $name"; cat "$OUT/${name}_summary.log" 2> /dev/null; done
  for name in throughput throughput_compile loss_scaling; do  # their tables, and throughput's verdict line
    echo "== $name"; grep -E '^\||^Full step' "$OUT/$name.md" 2> /dev/null
  done
  [ "$DRY_RUN" = 1 ] && printf '\n%s\n%s\n' \
    "Dry run: no CUDA here, so the CUDA-only tests were collected and skipped, no GPU utilisation was sampled" \
    "(unless an nvidia-smi is on PATH), and every figure above measures a tiny CPU run, not the targets."
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
! cut -f2 "$PARTS" | grep -qE '^(failed|timed out)$'
