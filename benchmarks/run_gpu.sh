#!/usr/bin/env bash
# One-call GPU benchmarks for issue 6: training step (batch 16/128/512, fp32 and bf16, eager and
# torch.compile) and sampling (DDIM-50, DDPM-1000, fp32 and bf16), ours vs diffusers' UNet2DModel,
# side by side in the same process. Results (text tables, JSON lines, environment) go to $OUT.
#
# The GPU machine has torch but no diffusers/ray/mlflow and no network (see ../shared/docs/GPU.md).
# 1. Here, on the dev machine (needs network once):   benchmarks/run_gpu.sh prepare
#      -> .whl/  diffusers + huggingface_hub + safetensors + small pure deps (py3.12 manylinux wheels)
#      -> .gpu/mnist/  the four MNIST IDX files, gzipped (~11 MB)
#    Both folders are git-ignored: name them in the device tool's `carry` (.whl and .gpu).
# 2. There (each part fits one 10-minute call; a fresh machine reinstalls the wheels, ~10 s):
#      bash benchmarks/run_gpu.sh train-eager      # fp32 + bf16, batch 16/128/512   (~3 min)
#      bash benchmarks/run_gpu.sh train-compile    # the same, torch.compile         (~6-8 min)
#      bash benchmarks/run_gpu.sh sampling         # DDIM-50 + DDPM-1000: fp32, bf16, bf16 + compile (~5 min)
#      bash benchmarks/run_gpu.sh packing          # 1, 2, 4 thesis trials sharing the GPU, fp32 + bf16 (~2 min)
#      bash benchmarks/run_gpu.sh graph            # issue 11: steps/s at batch 16, eager vs no-sync vs CUDA graph
#                                                  #   vs 8 stacked trials, + graph-vs-eager loss check (~3 min)
#      bash benchmarks/run_gpu.sh stacked-sampling # K=8 evaluations one after another vs batched (~1 min)
#      bash benchmarks/run_gpu.sh all              # everything (over 10 minutes: split it as above)
#      bash benchmarks/run_gpu.sh thesis           # studies/thesis.yaml end to end, without Ray/MLflow
#          (`studyctl launch thesis --local --no-tracking`, with THESIS_SET's overrides). One call runs up to
#          THESIS_BUDGET_S (default 540 s), then stops (SIGKILL: records and resume.pt are replaced atomically);
#          the same command in the next call resumes from the last evaluation: on a still-warm machine from
#          .gpu_run/ (git-ignored), on a fresh one from .gpu/thesis/ (copy the last call's thesis.tar.gz and
#          thesis_resume.partNN there: an unfinished run brings its resume state back in <= 15 MB parts).
#          Each call leaves $OUT/thesis.tar.gz (Parquet + PNG), status and log; unpack into results/thesis/.
#      bash benchmarks/run_gpu.sh study NAME       # studies/NAME.yaml end to end, analysis included, without Ray/MLflow,
#          within STUDY_BUDGET_S (default 540 s); $OUT/NAME.tar.gz holds its records and figures (results/NAME/)
#      bash benchmarks/run_gpu.sh issue11          # one call (~9.5 min, CALL_BUDGET_S): the graph step's speed and
#          its loss check, the thesis with that step (1k-sample evaluations), eager/stacked K=8 contenders,
#          stacked sampling -- each stage in the time left (BENCHMARKS.md, "Issue 11 on an NVIDIA H200")
#      bash benchmarks/run_gpu.sh levers           # one call (~9.5 min): issue 11's next levers, each checked against
#          its eager step: the graph step with bf16 / inductor kernels; one 10k-sample evaluation; the stacked graph
# Environment: OUT (default ./gpu_out), DEVICE (default cuda), PYTHON (default python3),
# SMOKE=1 (tiny sizes, to check the plumbing on a CPU: DEVICE=cpu PYTHON=.venv/bin/python SMOKE=1, and
# PYTHONPATH=benchmarks/gpu_machine_imports to refuse the imports the GPU machine lacks).
set -euo pipefail
cd "$(dirname "$0")/.."
PART="${1:-all}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-$PWD/gpu_out}"

WHEELS_PY=(diffusers==0.42.1 huggingface_hub==2.4.0 safetensors==0.8.0 regex filelock importlib_metadata zipp
           requests urllib3 idna certifi charset-normalizer fsspec httpx2 httpcore2 h11 anyio click hf-xet truststore
           pydantic==2.14.3 pydantic_core==2.50.4 annotated_types==0.8.0 typing_inspection==0.4.5
           typing_extensions==4.16.0)

if [[ "$PART" == prepare ]]; then
  mkdir -p .whl .gpu/mnist
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl "${WHEELS_PY[@]}"
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    gzip -c "${STUDYCTL_DATA_ROOT:-../shared/data}/MNIST/raw/$f" > ".gpu/mnist/$f.gz"
  done
  du -sh .whl .gpu
  echo "ready: carry [\".whl\", \".gpu\"] and run: bash benchmarks/run_gpu.sh train-eager | train-compile | sampling"
  exit 0
fi

mkdir -p "$OUT"
# --- wheels (diffusers is the benchmark peer; our code needs only torch + torchvision)
SITE=/tmp/studyctl_site
NEED="diffusers, pydantic"
[[ "$PART" == graph || "$PART" == stacked-sampling || "$PART" == levers ]] && NEED=torch  # diffusion_core only: no peer, no orchestrator
[[ "$PART" == issue11 || "$PART" == thesis || "$PART" == study ]] && NEED=pydantic       # the orchestrator, no peer
if ! "$PY" -c "import $NEED" 2>/dev/null; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PY" -c "import $NEED" || { echo "diffusers/pydantic are missing: run 'benchmarks/run_gpu.sh prepare' on the dev machine and carry .whl" >&2; exit 2; }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# --- data: an existing root, else the carried gzipped IDX files
if [[ -z "${STUDYCTL_DATA_ROOT:-}" || ! -d "${STUDYCTL_DATA_ROOT:-}/MNIST/raw" ]]; then
  if [[ -d ../shared/data/MNIST/raw ]]; then
    export STUDYCTL_DATA_ROOT="$(cd ../shared/data && pwd)"
  else
    export STUDYCTL_DATA_ROOT=/tmp/studyctl_data
    mkdir -p "$STUDYCTL_DATA_ROOT/MNIST/raw"
    for gz in .gpu/mnist/*.gz; do
      [[ -e "$gz" ]] || { echo "no MNIST: carry .gpu (benchmarks/run_gpu.sh prepare)" >&2; exit 2; }
      gunzip -c "$gz" > "$STUDYCTL_DATA_ROOT/MNIST/raw/$(basename "$gz" .gz)"
    done
  fi
fi

{ date -u; nvidia-smi 2>/dev/null || echo "(no nvidia-smi)"; "$PY" -c "import importlib.metadata as m, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', m.version('diffusers') if m.packages_distributions().get('diffusers') else None)"; } >> "$OUT/env.txt" 2>&1

if [[ "${SMOKE:-0}" == 1 ]]; then
  BATCHES=(4 8); IMAGES=16; ROUNDS=1; SBATCH=4; DDIM=(5); DDPM=()
else
  BATCHES=(16 128 512); IMAGES=4096; ROUNDS=3; SBATCH=1024; DDIM=(50); DDPM=(--ddpm)
fi

logged() {  # logged FILE CMD...: run CMD (a failure is reported, not fatal), warnings dropped, appended to $OUT/FILE
  local file="$1"; shift
  { "$@" 2>&1 || echo "FAILED: exit $?"; } | { grep -v -i "warn" || true; } | tee -a "$OUT/$file"
}

train_step() {  # $@: extra switches
  for prec in fp32 bf16; do
    echo "### bench_train_step --precision $prec $*" | tee -a "$OUT/train_step.txt"
    logged train_step.txt "$PY" benchmarks/bench_train_step.py --device "$DEVICE" --batch-sizes "${BATCHES[@]}" \
      --rounds "$ROUNDS" --images-per-round "$IMAGES" --precision "$prec" "$@" --json "$OUT/train_step.jsonl"
  done
}

sampling() {
  for amp in "" --bf16 "--bf16 --compile"; do
    echo "### bench_sampling --batch $SBATCH $amp" | tee -a "$OUT/sampling.txt"
    logged sampling.txt "$PY" benchmarks/bench_sampling.py --device "$DEVICE" --batch "$SBATCH" \
      --ddim-steps "${DDIM[@]}" ${DDPM[@]+"${DDPM[@]}"} --rounds 2 $amp
  done
}

packing() {  # k trials sharing the GPU (what a fractional gpus_per_worker gives) vs one alone
  for prec in fp32 bf16; do
    echo "### bench_packing --precision $prec" | tee -a "$OUT/packing.txt"
    logged packing.txt "$PY" benchmarks/bench_packing.py --device "$DEVICE" --packs 1 2 4 \
      --steps "${PACK_STEPS:-1000}" --precision "$prec" --json "$OUT/packing.jsonl"
  done
}

graph() {  # one thesis trial with the host in / out of the loop, and K=8 stacked trials (issue 11)
  local steps=2000 k=8 width=32
  [[ "${SMOKE:-0}" == 1 ]] && { steps=12; k=2; width=8; GRAPH_WARMUP="${GRAPH_WARMUP:-3}"; }
  echo "### bench_no_host --steps $steps --k $k" | tee -a "$OUT/graph.txt"
  logged graph.txt "$PY" benchmarks/bench_no_host.py --device "$DEVICE" --steps "$steps" \
    --warmup "${GRAPH_WARMUP:-100}" --k "$k" --width "$width" --json "$OUT/graph.jsonl"
  echo "### bench_stacked --k 8 (stacked vs sequential train())" | tee -a "$OUT/graph.txt"
  logged graph.txt "$PY" benchmarks/bench_stacked.py --device "$DEVICE" --k "$k" --width "$width" \
    --steps "$((steps / 8))" --warmup 20 --rounds 1 --deferred-sync --grouped-nhwc --json "$OUT/graph.jsonl"
}

stacked_sampling() {  # a stacked group's K=8 evaluations: one after another vs one batched pass (issue 11)
  # $1: the log file (default stacked_sampling.txt); $2: a time limit in seconds (default none)
  local file="${1:-stacked_sampling.txt}" n=1000 k=8 steps=50
  local limit=(); [[ -n "${2:-}" ]] && limit=(timeout "$2")
  [[ "${SMOKE:-0}" == 1 ]] && { n=8; k=2; steps=2; }
  echo "### bench_stacked_sampling --k $k --n-samples $n (DDIM-$steps)" | tee -a "$OUT/$file"
  logged "$file" ${limit[@]+"${limit[@]}"} "$PY" benchmarks/bench_stacked_sampling.py --device "$DEVICE" --k "$k" \
    --n-samples "$n" --steps "$steps" --batch-size "$n" --rounds 2
}

thesis() {
  # Table 1 of the thesis, plus what only the GPU run changes: 10,000-sample evaluations and the
  # fast path (override with THESIS_SET="FIELD=VALUE ..."; see `studyctl launch --help`).
  local run=.gpu_run/thesis sets=() kv
  for kv in ${THESIS_SET:-evaluation.n_samples=10000 evaluation.batch_size=2500 evaluation.precision=bf16 \
      evaluation.compile=true training.precision=bf16 training.channels_last=true}; do sets+=(--set "$kv"); done
  mkdir -p .gpu_run
  if [[ ! -d "$run" && -f .gpu/thesis/thesis.tar.gz ]]; then  # a fresh machine: the state an earlier call brought back
    mkdir -p "$run" && tar xzf .gpu/thesis/thesis.tar.gz -C "$run" && cat .gpu/thesis/thesis_resume.part* | tar x -C "$run"
    echo "### restored .gpu/thesis (records + resume state) into $run" | tee -a "$OUT/thesis_log.txt"
  fi
  local cmd=(launch thesis --local --no-tracking --output "$run" "${sets[@]}")
  [[ -f "$run/study.yaml" ]] && cmd=(resume "$run" --local)
  echo "### studyctl ${cmd[*]}" | tee -a "$OUT/thesis_log.txt"
  # SIGKILL at the budget is safe: records and the resume state are replaced atomically.
  timeout --signal=KILL "${THESIS_BUDGET_S:-540}" "$PY" -m orchestrator.cli "${cmd[@]}" 2>&1 \
      | tr '\r' '\n' | grep -v -i -E "warn|^training: " >> "$OUT/thesis_log.txt" || echo "(stopped: rc $?)" >> "$OUT/thesis_log.txt"
  "$PY" -m orchestrator.cli status "$run" > "$OUT/thesis_status.txt" 2>&1 || true
  "$PY" -m orchestrator.cli figures "$run" --no-mlflow >> "$OUT/thesis_status.txt" 2>&1 || true
  ( cd "$run" && tar czf "$OUT/thesis.tar.gz" --exclude='*.pdf' $(ls -d study.yaml trials train_steps epochs \
      residuals evals figures trial_files/*/summary.json trial_files/*/samples/*.png 2>/dev/null) )
  if ! grep -q COMPLETED "$OUT/thesis_status.txt"; then
    # Not finished: bring the resume state back too, in parts under the 16 MiB a returned file may have.
    # A later call on a fresh machine continues it: copy thesis.tar.gz and the parts into .gpu/thesis/ here.
    ( cd "$run" && tar cf - trial_files/*/resume.pt ) | split -b 15000000 -d - "$OUT/thesis_resume.part"
  fi
  tail -5 "$OUT/thesis_log.txt"; cat "$OUT/thesis_status.txt"
}

study() {
  # A packaged study end to end without Ray/MLflow (`studyctl launch $1 --local --no-tracking`), analysis
  # included (decompose, figures), within STUDY_BUDGET_S (default 540 s; SIGKILL at the budget is safe:
  # records are replaced atomically). Brings back $OUT/$1.tar.gz: the study's records (Parquet), figures
  # (PNG), ground_truth/ (the fitted MoLRG) and each trial's summary and sample grids -- what results/$1/
  # ships (the weights stay there: too large to bring back). SMOKE=1: 12 steps, 2 seeds, a tiny decomposition.
  local name="${1:?usage: run_gpu.sh study NAME}" run sets=()
  run=".gpu_run/$name"
  [[ "${SMOKE:-0}" == 1 ]] && sets=(--set training.max_steps=12 --set training.eval_every=6 --set training.eval_start=6
    --set training.val_every=6 --set "sweep.seeds=[0, 1]" --set analysis.decompose_points=16
    --set evaluation.n_samples=8 --set evaluation.grid_images=8 --set evaluation.steps=3
    --set evaluation.residual_images=8 --set evaluation.t_grid=3 --set data.val_size=64
    --set resources.gpus_per_worker=0 --set resources.cpus_per_worker=1)
  rm -rf "$run" && mkdir -p .gpu_run
  echo "### studyctl launch $name --local --no-tracking ${sets[*]}" | tee -a "$OUT/${name}_log.txt"
  local t0=$SECONDS
  timeout --signal=KILL "${STUDY_BUDGET_S:-540}" "$PY" -m orchestrator.cli launch "$name" --local --no-tracking \
      --output "$run" ${sets[@]+"${sets[@]}"} 2>&1 | tr '\r' '\n' | grep -v -i -E "warn|^training: |it/s\]$" \
      >> "$OUT/${name}_log.txt" || echo "(stopped: rc $?)" >> "$OUT/${name}_log.txt"
  echo "### launch wall time $(( SECONDS - t0 )) s" | tee -a "$OUT/${name}_log.txt"
  "$PY" -m orchestrator.cli status "$run" >> "$OUT/${name}_log.txt" 2>&1 || true
  ( cd "$run" && tar czf "$OUT/$name.tar.gz" --exclude='*.pdf' $(ls -d study.yaml trials train_steps epochs residuals \
      evals decomposition reference_distances distance_to_memorization sample_quality ground_truth figures \
      trial_files/*/summary.json trial_files/*/samples/*.png 2>/dev/null) )
  if (( $(stat -c %s "$OUT/$name.tar.gz") > 15000000 )); then  # a returned file holds at most 16 MiB
    split -b 15000000 -d "$OUT/$name.tar.gz" "$OUT/$name.tar.gz.part" && rm "$OUT/$name.tar.gz"
  fi
  ls -la "$OUT"; tail -40 "$OUT/${name}_log.txt"
}

issue11() {
  # Issue 11 in one 10-minute call, most valuable first: (1) does the CUDA-graph step run and replay
  # the eager step, and how fast (~30 s); (2) the thesis end to end with that step (CALL_BUDGET_S
  # minus what 3 and 4 need); (3) the other single-trial contenders and 8 stacked trials; (4) a
  # stacked group's batched sampling. Each stage gets what time is left; every stage writes to $OUT.
  local t0; t0=$(date +%s)
  local budget="${CALL_BUDGET_S:-560}" steps=2000 warm=100 k=8 width=32 tail_s=120
  [[ "${SMOKE:-0}" == 1 ]] && { steps=12; warm=3; k=2; width=8; tail_s=20; }
  left() { echo $(( budget - ($(date +%s) - t0) )); }
  echo "### bench_no_host --only graph (probe; $steps steps)" | tee -a "$OUT/graph.txt"
  logged graph.txt timeout 120 "$PY" benchmarks/bench_no_host.py --device "$DEVICE" --only graph --k 0 \
    --steps "$steps" --warmup "$warm" --width "$width" --json "$OUT/graph.jsonl"
  # The thesis's own 1,000-sample DDPM-1000 evaluations (Table 1's run as shipped), sampled in bf16 with
  # compile's CUDA graphs, all 1,000 in one batch; training fp32 (TF32 convolutions) with the graph step,
  # or with compile's CUDA graphs where the probe found no graph step.
  local evals="evaluation.precision=bf16 evaluation.compile=true evaluation.batch_size=1000"
  local graphed="training.cuda_graph=true training.device_noise=true training.deferred_sync=true"
  local compiled="training.compile=true training.compile_mode=reduce-overhead"
  local step="$graphed"; grep -q '"graph": [0-9]' "$OUT/graph.jsonl" 2>/dev/null || step="$compiled"
  THESIS_SET="${THESIS_SET:-$step $evals}" THESIS_BUDGET_S="$(( $(left) - tail_s ))" thesis
  if [[ "$step" == "$graphed" ]] && grep -q "FAILED" "$OUT/thesis_status.txt" && (( $(left) > 200 )); then
    echo "### thesis FAILED with the graph step: again with compile (reduce-overhead)" | tee -a "$OUT/thesis_log.txt"
    rm -rf .gpu_run/thesis
    THESIS_SET="$compiled $evals" THESIS_BUDGET_S="$(( $(left) - tail_s ))" thesis
  fi
  echo "### bench_no_host eager, eager+nosync, stacked K=$k ($(left) s left)" | tee -a "$OUT/graph.txt"
  logged graph.txt timeout "$(( $(left) > 30 ? $(left) - 30 : 1 ))" "$PY" benchmarks/bench_no_host.py \
    --device "$DEVICE" --only eager eager+nosync --k "$k" --steps "$(( steps / 4 ))" --warmup "$warm" \
    --width "$width" --check-steps 0 --json "$OUT/graph.jsonl"
  if (( $(left) > 40 )); then stacked_sampling graph.txt "$(( $(left) - 10 ))"; fi
  echo "issue11: $(( $(date +%s) - t0 )) s"
  # At most 8 files come back: fold the environment and the status into the logs.
  cat "$OUT/env.txt" >> "$OUT/graph.txt" && rm "$OUT/env.txt"
  cat "$OUT/thesis_status.txt" >> "$OUT/thesis_log.txt" && rm "$OUT/thesis_status.txt"
}

levers() {
  # Issue 11's next levers in one call (CALL_BUDGET_S, ~9.5 min), most valuable first, each checked:
  # (1) one thesis trial's step at batch 16 (target >= 1,000 steps/s): the CUDA graph with bf16, with
  #     inductor's fused kernels (compile), both -- each against its own eager step (dropout 0, 50 steps);
  # (2) one evaluation as the 10k target counts it: 10,000 DDPM-1000 samples + metrics, bf16 + compile,
  #     all 10,000 in one batch (target <= 20 s; the thesis call's 1,000 took 5.7 s);
  # (3) 8 stacked trials, eager vs the stacked step as one CUDA graph (target >= 8x one eager trial).
  local t0; t0=$(date +%s)
  local budget="${CALL_BUDGET_S:-560}" steps=2000 warm=100 k=8 width=32 n=10000
  local eval_args=(--sampler ddpm --rounds 1) check_args=()
  [[ "${SMOKE:-0}" == 1 ]] && { steps=12; warm=3; k=2; width=8; n=16; check_args=(--steps 12 --width 8)
    eval_args=(--sampler ddim --steps 2 --residual-images 8); }
  left() { echo $(( budget - ($(date +%s) - t0) )); }
  echo "### bench_no_host --only graph graph+bf16 graph+compile graph+compile+bf16 ($steps steps)" | tee -a "$OUT/levers.txt"
  logged levers.txt timeout "$(( budget * 45 / 100 ))" "$PY" benchmarks/bench_no_host.py --device "$DEVICE" \
    --only graph graph+bf16 graph+compile graph+compile+bf16 --k 0 --steps "$steps" --warmup "$warm" --width "$width" \
    --json "$OUT/levers.jsonl"
  echo "### bench_evaluation --n-samples $n --batch-sizes $n --bf16 --compile ($(left) s left)" | tee -a "$OUT/levers.txt"
  logged levers.txt timeout "$(( $(left) * 60 / 100 ))" "$PY" benchmarks/bench_evaluation.py --device "$DEVICE" \
    --n-samples "$n" --batch-sizes "$n" --bf16 --compile "${eval_args[@]}" --json "$OUT/levers.jsonl"
  echo "### check_stacked_graph (graph vs eager stacked losses, recapture, generator states; $(left) s left)" \
    | tee -a "$OUT/levers.txt"
  logged levers.txt timeout 90 "$PY" benchmarks/check_stacked_graph.py --device "$DEVICE" ${check_args[@]+"${check_args[@]}"}
  echo "### bench_no_host --only eager, stacked K=$k eager vs graph ($(left) s left)" | tee -a "$OUT/levers.txt"
  logged levers.txt timeout "$(( $(left) > 20 ? $(left) - 10 : 1 ))" "$PY" benchmarks/bench_no_host.py \
    --device "$DEVICE" --only eager --k "$k" --steps "$(( steps / 4 ))" --warmup "$warm" --width "$width" \
    --json "$OUT/levers.jsonl"
  echo "levers: $(( $(date +%s) - t0 )) s"
  cat "$OUT/env.txt" >> "$OUT/levers.txt" && rm "$OUT/env.txt"
}

case "$PART" in
  train-eager)   train_step ;;
  train-compile) train_step --compile ;;
  sampling)      sampling ;;
  all)           train_step; train_step --compile; sampling; packing ;;
  packing)       packing ;;
  graph)         graph ;;
  stacked-sampling) stacked_sampling ;;
  thesis)        thesis ;;
  study)         study "${2:-}" ;;
  issue11)       issue11 ;;
  levers)        levers ;;
  *) echo "usage: $0 prepare | train-eager | train-compile | sampling | packing | graph | stacked-sampling | all | thesis | study NAME | issue11 | levers" >&2; exit 2 ;;
esac
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
