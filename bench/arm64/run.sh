#!/usr/bin/env bash
# The edge client on arm64, within a Pi's 512 MB: a real `splitlm edge` in an emulated Debian
# bookworm arm64 userland (Raspberry Pi OS 64-bit's base, Python 3.11) against a `splitlm serve`
# on this host over loopback, under a cgroup v1 memory cap and one core. Its per-step losses must
# equal an x86 client's for the same bundle, data and seed.
#
#   sudo bench/arm64/run.sh          (Debian host, root; first run ~15 min, later runs ~1-2 min)
#
# Needs: apt-get install -y debootstrap qemu-user-static binfmt-support; a host Python with
# splitlm[all] ($PY, default the repo's .venv); a cgroup v1 memory controller at
# /sys/fs/cgroup/memory. Settings (env): STEPS (3), MEM_MB (512), TOL (1e-3), ARM64_CACHE
# (/var/cache/splitlm: the userland, wheels and tiny bundle are cached there), CLIENT_TIMEOUT
# (1800 s for the emulated client). MODEL and BUNDLE (both or neither): serve MODEL and train
# BUNDLE (copied into the cache; a split bundle with labels on the device) instead of the tests'
# tiny Llama, e.g. MODEL=default BUNDLE=/tmp/smol-fp32-dev.q4. EDGE_EXTRA: more `splitlm edge`
# options for both clients, e.g. EDGE_EXTRA=--keep-activations with a bundle exported with it.
# Last line: one JSON object (ok, losses, max_loss_diff, peak RSS, step time). Exit status 1 when
# the losses differ or the cap was hit (an OOM kill in the cgroup, or the client failing).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${ARM64_CACHE:-/var/cache/splitlm}
ROOT=$CACHE/arm64-bookworm
WHEELS=$CACHE/arm64-wheels
WORK=$CACHE/arm64-work
STEPS=${STEPS:-3}
MEM_MB=${MEM_MB:-512}
TOL=${TOL:-1e-3}
PY=${PY:-$REPO/.venv/bin/python}
CG=/sys/fs/cgroup/memory/splitlm-arm64
export OMP_NUM_THREADS=1
CLIENT_TIMEOUT=${CLIENT_TIMEOUT:-1800}
MODEL=${MODEL:-}
BUNDLE=${BUNDLE:-}
read -r -a EDGE_EXTRA <<< "${EDGE_EXTRA:-}"
EDGE_ARGS=(--steps "$STEPS" --batch-size 2 --seq-len 32 --threads 1 --seed 0 "${EDGE_EXTRA[@]}")

say() { echo "[arm64] $*" >&2; }
[ "$(id -u)" = 0 ] || { echo "run.sh: needs root (debootstrap, chroot, mount, cgroups)" >&2; exit 2; }
[ -d /sys/fs/cgroup/memory ] || { echo "run.sh: no cgroup v1 memory controller at /sys/fs/cgroup/memory" >&2; exit 2; }
if { [ -n "$MODEL" ] && [ -z "$BUNDLE" ]; } || { [ -z "$MODEL" ] && [ -n "$BUNDLE" ]; }; then
  echo "run.sh: set MODEL and BUNDLE together, or neither" >&2; exit 2
fi

# 1. the userland (cached; bootstrap.sh is a no-op once it is there)
t0=$SECONDS
"$HERE/bootstrap.sh" "$ROOT"
say "userland ready ($((SECONDS - t0)) s)"

# 2. arm64 wheels of splitlm[edge], resolved on this host from the splitlm wheel's own metadata
#    (pyproject's [edge] extra is the one list); splitlm itself is pure Python. The cache is
#    checked offline first and topped up online only when it lacks something the extra needs.
mkdir -p "$WHEELS" "$WORK"
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/splitlm" "$REPO/protocol" "$REPO/edge_client" \
  "$REPO/cloud_server" "$REPO/export" "$REPO/audit" "$BUILD/"
rm -f "$WHEELS"/splitlm-*.whl
"$PY" -m pip wheel -q --no-deps -w "$WHEELS" "$BUILD" >/dev/null  # setuptools from PyPI, isolated
SPLITLM_WHL=$(ls "$WHEELS"/splitlm-*.whl)
ARM_PLATFORM=(--platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64
              --only-binary=:all: --python-version 3.11)
if ! "$PY" -m pip download -q --no-index --find-links "$WHEELS" --dest "$BUILD/check" "${ARM_PLATFORM[@]}" \
     "splitlm[edge] @ file://$SPLITLM_WHL" >/dev/null 2>&1; then
  say "fetching the arm64 wheels splitlm[edge] needs"
  "$PY" -m pip download -q --find-links "$WHEELS" --dest "$WHEELS" "${ARM_PLATFORM[@]}" \
    "splitlm[edge] @ file://$SPLITLM_WHL"
fi

# 3. mounts: /proc with a Raspberry Pi 4's cpuinfo over it (onnxruntime's cpuinfo segfaults under
#    qemu 7.2 on the host's x86 one), the wheels and the work folder
cleanup() {
  for m in work wheels proc/cpuinfo proc; do umount "$ROOT/$m" 2>/dev/null || true; done
  [ -n "${SERVER:-}" ] && kill "$SERVER" 2>/dev/null || true
  rm -rf "$BUILD"
}
trap cleanup EXIT
mkdir -p "$ROOT/work" "$ROOT/wheels"
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
mount --bind "$HERE/cpuinfo-pi4.txt" "$ROOT/proc/cpuinfo"
mount --bind "$WHEELS" "$ROOT/wheels"
mount --bind "$WORK" "$ROOT/work"

# 4. splitlm[edge] in a venv inside the userland (dependencies once; splitlm on every run)
t0=$SECONDS
if [ ! -x "$ROOT/opt/splitlm/bin/python" ]; then
  chroot "$ROOT" python3 -m venv /opt/splitlm
fi
chroot "$ROOT" /opt/splitlm/bin/python -m pip install -q --no-index --find-links /wheels --force-reinstall \
  --no-deps /wheels/"$(basename "$WHEELS"/splitlm-*.whl)"
chroot "$ROOT" /opt/splitlm/bin/python -m pip install -q --no-index --find-links /wheels "splitlm[edge]"
say "splitlm[edge] installed in the arm64 userland ($((SECONDS - t0)) s)"

# 5. the tiny model, its q4 bundle (labels on the device) and data, made on the host (cached);
#    or MODEL and a copy of BUNDLE, with the server's LoRA settings read from its manifest
"$PY" "$HERE/host.py" prepare "$WORK"
if [ -n "$BUNDLE" ]; then
  rm -rf "$WORK/bundle-ext" && cp -r "$BUNDLE" "$WORK/bundle-ext"
  SERVE_MODEL=$MODEL BUNDLE_NAME=bundle-ext
  read -r -a LORA_ARGS < <("$PY" -c 'import json, sys; l = json.load(open(sys.argv[1]))["lora"]
print("--lora-rank", l["rank"], "--lora-alpha", l["alpha"], "--lora-targets", *l["targets"])' "$WORK/bundle-ext/manifest.json")
  CUT=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["cut"])' "$WORK/bundle-ext/manifest.json")
else
  SERVE_MODEL=$WORK/tiny-llama BUNDLE_NAME=bundle LORA_ARGS=(--lora-rank 4) CUT=2
fi
SERVE_ARGS=(--cut "$CUT" --labels device "${LORA_ARGS[@]}" --port 0 --threads 1)

serve() {  # start a fresh server; sets SERVER (pid) and URL
  rm -f "$WORK/serve.log"
  "$PY" -m splitlm.cli serve "$SERVE_MODEL" "${SERVE_ARGS[@]}" >"$WORK/serve.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1500); do
    URL=$(grep -o 'listening on ws://[^ ]*' "$WORK/serve.log" | head -1 | cut -d' ' -f3) || true
    [ -n "$URL" ] && return 0
    kill -0 "$SERVER" 2>/dev/null || { cat "$WORK/serve.log" >&2; exit 1; }
    sleep 0.2
  done
  echo "run.sh: the server did not start" >&2; exit 1
}
stop() { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=; }

# 6. the x86 client: the reference losses
serve
rm -f "$WORK/x86.jsonl"
(cd "$WORK" && "$PY" -m splitlm.cli edge "$URL" --bundle "$WORK/$BUNDLE_NAME" --data "$WORK/data.jsonl" "${EDGE_ARGS[@]}" \
   --metrics-out "$WORK/x86.jsonl" >&2)
stop

# 7. the arm64 client, emulated, in a memory cgroup capped at MEM_MB, on one core
serve
rm -f "$WORK/arm64.jsonl"
mkdir -p "$CG"
echo 0 > "$CG/memory.force_empty" 2>/dev/null || true
echo $((MEM_MB * 1024 * 1024)) > "$CG/memory.limit_in_bytes"
echo 0 > "$CG/memory.max_usage_in_bytes"
kills_before=$(awk '/^oom_kill /{print $2}' "$CG/memory.oom_control")
t0=$SECONDS
set +e
( echo "$BASHPID" > "$CG/cgroup.procs"
  exec timeout "$CLIENT_TIMEOUT" taskset -c 0 chroot "$ROOT" /opt/splitlm/bin/splitlm edge "$URL" --bundle "/work/$BUNDLE_NAME" --data /work/data.jsonl "${EDGE_ARGS[@]}" \
    --metrics-out /work/arm64.jsonl >&2 )
rc=$?
set -e
stop
kills=$(( $(awk '/^oom_kill /{print $2}' "$CG/memory.oom_control") - kills_before ))
peak=$(( $(cat "$CG/memory.max_usage_in_bytes") / 1000000 ))
say "arm64 client exit status $rc after $((SECONDS - t0)) s; cgroup peak ${peak} MB (page cache included), OOM kills $kills"
[ -s "$WORK/arm64.jsonl" ] || touch "$WORK/arm64.jsonl"
"$PY" "$HERE/host.py" compare "$WORK/x86.jsonl" "$WORK/arm64.jsonl" --tol "$TOL" --cgroup-peak-mb "$peak" \
  --oom-kills "$kills" || exit 1
[ "$rc" = 0 ] || exit 1
