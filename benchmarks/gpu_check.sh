#!/usr/bin/env bash
# Issue 5's GPU checks in one run, from the repository root of a 1-GPU machine (a working
# venv in .venv, or `python` with the project's dependencies), in under 8 minutes:
#
#   a. the card, torch and CUDA versions;
#   b. benchmarks/throughput.py at batch 1024, 16-mixed, 60,000 28x28 images held on the
#      device: bare loop / framework / pipeline images/s, plain and with channels_last, then
#      model.compile=true (fewer steps); goal: >= 100,000 images/s;
#   c. a device-sync report: 30 training steps of the default config through the real
#      training job (run_training) with the data on the GPU, torch.cuda sync debug mode on
#      during each step after step 5 and between steps (data fetch), warnings counted;
#   d. the full pipeline end to end: python train.py trainer.accelerator=gpu (16-mixed), its
#      test metrics and wall time; then debug=fast with model.compile=true; then the plain
#      `python train.py trainer.accelerator=gpu` (32-true) if time is left.
#
# Every step runs under `timeout`, inside one overall budget (BUDGET seconds, default 420):
# the steps run in order of importance and a step that no longer fits is skipped. The log,
# the throughput JSON files, the metrics.json files and summary.txt go to $OUT if set, else
# ./gpu_check_out/.
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine
#   DEVICE=cpu STEPS=20 bash benchmarks/gpu_check.sh  # a scaled-down dry run on a CPU
#
# The device machines' image has torch and Lightning but not hydra-core, omegaconf, faiss-cpu
# or mlxtend: run `bash benchmarks/gpu_wheels.sh` here first (it fills .whl/, about 20 MB) and
# carry .whl; this script installs what is in .whl into /tmp/siamese_site and puts it on
# PYTHONPATH. Without a .venv, PYTHON is `python`, or `python3` where there is no `python`.
#
# Knobs (environment): DEVICE (cuda|cpu), STEPS, WARMUP, REPEATS, IMAGES, BATCH, SPC
# (samples per class), PRECISION, COMPILE_STEPS, BUDGET, PYTHON; SYNC_CHECK=1 runs the sync
# check's code on a CPU too (it then finds nothing to report).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -f .venv/bin/activate ]]; then
    set +u
    # shellcheck disable=SC1091
    source .venv/bin/activate
    set -u
fi
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python
    command -v python >/dev/null || PYTHON=python3
fi
DEVICE=${DEVICE:-cuda}
OUTDIR=${OUT:-./gpu_check_out}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG="$OUTDIR/gpu_check.log"
SUMMARY_FILE="$OUTDIR/summary.txt"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

if [[ $DEVICE == cpu ]]; then # dry run: small, no sync check, no compile
    STEPS=${STEPS:-20} WARMUP=${WARMUP:-5} REPEATS=${REPEATS:-1} IMAGES=${IMAGES:-5000}
    BATCH=${BATCH:-160} SPC=${SPC:-16} PRECISION=${PRECISION:-bf16-mixed}
    ACCEL=cpu
else
    STEPS=${STEPS:-300} WARMUP=${WARMUP:-30} REPEATS=${REPEATS:-2} IMAGES=${IMAGES:-60000}
    BATCH=${BATCH:-1024} SPC=${SPC:-128} PRECISION=${PRECISION:-16-mixed}
    ACCEL=gpu
fi
COMPILE_STEPS=${COMPILE_STEPS:-150}
BUDGET=${BUDGET:-420}
GOAL=100000
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
START=$SECONDS
SUMMARY=()

say() { printf '\n==== %s (%ss elapsed, %ss of the budget left)\n' "$1" $((SECONDS - START)) "$(left)"; }
left() { echo $((BUDGET - (SECONDS - START))); }
note() {
    SUMMARY+=("$1")
    echo "$1"
}

# step NAME MAX_SECONDS MIN_SECONDS COMMAND...: run COMMAND under timeout (at most MAX and
# what is left of the budget), or skip it when less than MIN is left. Never fails the script.
step() {
    local name=$1 max=$2 min=$3 rem t t0 rc=0
    shift 3
    rem=$(left)
    say "$name"
    if ((rem < min)); then
        note "$name: SKIPPED (${rem}s of the budget left, needs ${min}s)"
        return 0
    fi
    t=$((max < rem ? max : rem))
    t0=$SECONDS
    echo "+ $* (timeout ${t}s)"
    timeout -k 10 "$t" "$@" || rc=$?
    if ((rc == 124 || rc == 137)); then
        note "$name: TIMED OUT after $((SECONDS - t0))s"
    elif ((rc != 0)); then
        note "$name: FAILED (exit $rc) after $((SECONDS - t0))s"
    else
        note "$name: ok in $((SECONDS - t0))s"
    fi
    return 0
}

# ---------------------------------------------------------------- a. the machine
say "a. machine"
shopt -s nullglob
WHEELS=(.whl/*.whl)
shopt -u nullglob
if ((${#WHEELS[@]})); then # packages the machine's image lacks (benchmarks/gpu_wheels.sh)
    echo "installing ${#WHEELS[@]} carried wheels into /tmp/siamese_site"
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/siamese_site "${WHEELS[@]}"; then
        export PYTHONPATH="/tmp/siamese_site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "installing the carried wheels failed"
    fi
fi
MISSING=$("$PYTHON" -c '
import importlib.util as u
print(" ".join(n for n in ("hydra", "omegaconf", "faiss", "mlxtend") if u.find_spec(n) is None))')
if [[ -n $MISSING ]]; then
    echo "missing packages: $MISSING"
    echo "run bash benchmarks/gpu_wheels.sh where pip works and carry .whl"
    exit 1
fi
if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi -L || true
else
    echo "nvidia-smi: not found"
fi
timeout 60 "$PYTHON" -c '
import torch, pytorch_lightning as pl
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"lightning {pl.__version__}, GPUs {torch.cuda.device_count()}")
if torch.cuda.is_available():
    print("device 0:", torch.cuda.get_device_name(0))
' || true
if [[ $DEVICE != cpu ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "no CUDA GPU visible: run with DEVICE=cpu for a dry run"
    exit 1
fi

# ---------------------------------------------------------------- b. throughput
TP=(benchmarks/throughput.py --device "$DEVICE" --precision "$PRECISION" --images "$IMAGES"
    data.batch_size="$BATCH" data.samples_per_class="$SPC")
step "b1. throughput, plain" 150 60 \
    "$PYTHON" "${TP[@]}" --steps "$STEPS" --warmup "$WARMUP" --repeats "$REPEATS" \
    --json "$OUTDIR/throughput_plain.json"

# ---------------------------------------------------------------- d1. full pipeline
# The default run: 20 epochs on the 3,500 embedded training digits, then the test.
train_run() { # NAME TIMEOUT MIN OVERRIDES...
    local name=$1 max=$2 min=$3 dir line t0=$SECONDS
    shift 3
    dir="$TMP/$(echo "$name" | tr -c 'a-zA-Z0-9\n' '_')"
    step "$name" "$max" "$min" "$PYTHON" train.py "$@" hydra.run.dir="$dir"
    if [[ -f $dir/metrics.json ]]; then
        cp "$dir/metrics.json" "$OUTDIR/metrics_$(basename "$dir").json"
        line=$("$PYTHON" - "$dir/metrics.json" "$name" $((SECONDS - t0)) <<'EOF' || true
import json, sys
m = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]}: test/precision_at_1 {m.get('test/precision_at_1', float('nan')):.4f}, "
      f"test/roc_auc {m.get('test/roc_auc', float('nan')):.4f}, wall {sys.argv[3]}s "
      "(the whole command)")
EOF
        )
        note "$line"
    fi
}
if [[ $DEVICE == cpu ]]; then
    train_run "d1. train.py (cpu, 1 short epoch)" 300 60 trainer.accelerator=cpu \
        trainer.precision="$PRECISION" trainer.max_epochs=1 trainer.limit_train_batches="$STEPS"
else
    train_run "d1. train.py trainer.accelerator=gpu trainer.precision=16-mixed" 180 60 \
        trainer.accelerator=gpu trainer.precision=16-mixed
fi

# ---------------------------------------------------------------- b2. channels_last
step "b2. throughput, model.channels_last=true" 150 60 \
    "$PYTHON" "${TP[@]}" --steps "$STEPS" --warmup "$WARMUP" --repeats "$REPEATS" \
    --json "$OUTDIR/throughput_channels_last.json" model.channels_last=true

# ---------------------------------------------------------------- c. device syncs
if [[ $DEVICE == cpu && ${SYNC_CHECK:-0} != 1 ]]; then
    say "c. device-sync check"
    note "c. device-sync check: skipped on the CPU"
else
    step "c. device-sync check" 120 45 env SYNC_DIR="$TMP/sync" SYNC_ACCEL="$ACCEL" "$PYTHON" - <<'EOF'
"""30 steps of the default config through run_training with the data on the GPU; sync debug
mode on during training steps 6..30 and between them (data fetch), off at epoch ends and
logging points (log_every_n_steps is larger than the run)."""
import collections
import os
import sys
import traceback
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

sys.path.insert(0, os.getcwd())
from siamese.pipelines.train import run_training  # noqa: E402

WARMUP, STEPS = 5, 30
records = collections.defaultdict(list)  # window ("step" or "between") -> stacks
window = None


def show(message, category, filename, lineno, file=None, line=None):
    if window is None or "synchroniz" not in str(message).lower():
        return shown(message, category, filename, lineno, file, line)
    stack = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename]
    records[window].append((str(message).splitlines()[0], stack))


def mode(name):
    global window
    window = name
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn" if name else "default")


class SyncOn(pl.Callback):  # first callback: the window opens before the others' hooks
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        mode("step" if trainer.global_step >= WARMUP else None)


class SyncOff(pl.Callback):  # last callback (but ModelCheckpoint)
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        done = trainer.global_step >= trainer.max_steps
        mode("between" if trainer.global_step >= WARMUP and not (last_of_epoch or done) else None)

    def on_train_epoch_end(self, trainer, pl_module):
        mode(None)


def run(precision):
    records.clear()
    overrides = [
        f"trainer.accelerator={os.environ.get('SYNC_ACCEL', 'gpu')}",
        f"trainer.precision={precision}",
        f"++trainer.max_steps={STEPS}",
        "trainer.log_every_n_steps=1000",
        # The progress bar stays on, as in train.py: its per-step refresh is inside the windows.
        "++data.on_device=true",
        "test=false",
        "~callbacks.plots",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(Path("conf").resolve())):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = f"{os.environ['SYNC_DIR']}/{precision}"
        callbacks = OmegaConf.to_container(cfg.callbacks)
        cfg.callbacks = {
            "sync_on": {"_target_": "__main__.SyncOn"},
            **callbacks,
            "sync_off": {"_target_": "__main__.SyncOff"},
        }
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=".*synchroniz")  # every one, not once
        warnings.showwarning = show
        try:
            run_training(cfg)
        finally:
            mode(None)
    timed = STEPS - WARMUP
    print(f"sync check, {precision}, batch {cfg.data.batch_size}, data.on_device=true, {timed} steps:")
    for name in ("step", "between"):
        got = records[name]
        print(f"  {name:<8} {len(got):4d} synchronizing operations ({len(got) / timed:.1f} a step)")
        where = collections.Counter()
        for message, stack in got:
            ours = [f for f in stack if "/siamese/" in f.filename] or stack
            frames = " <- ".join(
                f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack[-3:])
            )
            where[(frames, f"{Path(ours[-1].filename).name}:{ours[-1].lineno}", message)] += 1
        for (frames, ours, message), n in where.most_common(6):
            print(f"    {n:4d}x {frames}  [project: {ours}]  {message[:80]}")


shown = warnings.showwarning
for precision in ("32-true", "16-mixed" if torch.cuda.is_available() else "bf16-mixed"):
    run(precision)
EOF
fi

# ---------------------------------------------------------------- b3. compile
if [[ $DEVICE == cpu ]]; then
    say "b3. throughput, model.compile=true"
    note "b3. throughput, model.compile=true: skipped on the CPU"
else
    step "b3. throughput, model.compile=true" 180 100 \
        "$PYTHON" "${TP[@]}" --steps "$COMPILE_STEPS" --warmup 50 --repeats 1 \
        --json "$OUTDIR/throughput_compile.json" model.compile=true
fi

# ---------------------------------------------------------------- d2, d3. more train.py
if [[ $DEVICE == cpu ]]; then
    say "d2, d3. train.py with compile / 32-true"
    note "d2, d3. train.py debug=fast model.compile=true, plain gpu run: skipped on the CPU"
else
    train_run "d2. train.py trainer.accelerator=gpu debug=fast model.compile=true" 150 60 \
        trainer.accelerator=gpu debug=fast model.compile=true
    train_run "d3. train.py trainer.accelerator=gpu (32-true)" 150 75 trainer.accelerator=gpu
fi

# ---------------------------------------------------------------- summary
say "summary"
"$PYTHON" - "$OUTDIR" "$GOAL" "$DEVICE" <<'EOF' | tee "$TMP/goal" || true
import json, sys
from pathlib import Path

out, goal, device = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
for name in ("plain", "channels_last", "compile"):
    path = out / f"throughput_{name}.json"
    if not path.is_file():
        print(f"throughput {name}: no result")
        continue
    r = json.loads(path.read_text())
    rates, ratios = r["images_per_sec"], r["ratio_to_bare"]
    text = ", ".join(f"{k} {v:,.0f}" for k, v in rates.items())
    ratio = ", ".join(f"{k}/bare {v:.3f}" for k, v in ratios.items())
    judged = "pipeline" if "pipeline" in rates else "framework"
    best = rates.get(judged, 0.0)
    verdict = (
        f"goal >= {goal:,.0f} ({judged}): {'MET' if best >= goal else 'NOT MET'}"
        if device != "cpu"
        else "goal not applicable on a CPU"
    )
    print(
        f"throughput {name} ({r['device']}, {r['precision']}, batch {r['batch_size']}, "
        f"{r['images']} images, pipeline images on {r.get('pipeline_images_on')}): images/s "
        f"{text}; {ratio}; {verdict}"
    )
EOF
while IFS= read -r line; do SUMMARY+=("$line"); done <"$TMP/goal"
{
    echo "gpu_check summary ($(date -u +%FT%TZ), device $DEVICE, $((SECONDS - START))s)"
    for line in "${SUMMARY[@]}"; do echo "  $line"; done
} | tee "$SUMMARY_FILE"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null || true
