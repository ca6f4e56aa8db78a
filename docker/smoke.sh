#!/usr/bin/env bash
# make docker-smoke: build docker/Dockerfile as the GPU image is built, on a local Debian base with the CPU
# torch and DeepSpeed's ops built for the CPU accelerator (build arguments; every step the same), then
# prove it with real containers on a Docker network of their own:
#   - `docker run IMAGE` prints help; `worker` without a key stops with a clear message;
#   - a two-node job across containers (head + worker, ssh on port 2222, pdsh, `llm-ds launch` and the
#     unmodified `deepspeed --hostfile` path, 1 CPU rank each, ZeRO-2): the loss falls, summary.json lands
#     on a volume;
#   - `docker stop` on the head while it trains: a checkpoint at the stopped step, status 0.
# The docker run lines are the README's, on a network of their own instead of the host's, without --gpus,
# and with --shm-size 1g.
# Everything it made is removed at the end, also when a step fails. Without a Docker engine it starts
# one (as root, with apt: docker.io, data under a temporary folder) and stops it at the end; where it
# cannot, it says why and skips.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
IMAGE="${IMAGE:-llm-ds:smoke}"
BASE_IMAGE="${BASE_IMAGE:-llm-ds-base:bookworm}"
TORCH_VERSION="$(sed -n 's/^ARG TORCH_VERSION=//p' docker/Dockerfile)"
RUN_ID="llm-ds-smoke-$$"
work="$(mktemp -d /tmp/llm-ds-smoke.XXXXXX)"
dockerd_pid="" http_pid=""

say() { printf '[docker-smoke] %s\n' "$*"; }

cleanup() {
  local ids
  ids="$(docker ps -aq --filter "label=$RUN_ID" 2>/dev/null || true)"
  [ -n "$ids" ] && docker rm -f $ids >/dev/null 2>&1
  docker network rm "$RUN_ID" >/dev/null 2>&1 || true
  docker volume rm "$RUN_ID" >/dev/null 2>&1 || true
  [ -n "$http_pid" ] && kill "$http_pid" 2>/dev/null
  if [ -n "$dockerd_pid" ]; then
    kill "$dockerd_pid" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
  fi
  # What dockerd left mounted under its folders (network namespaces), deepest first.
  awk -v w="$work" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount 2>/dev/null || true
  rm -rf "$work" 2>/dev/null || true
}
trap cleanup EXIT

engine() {
  docker info >/dev/null 2>&1 && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "SKIPPED: no Docker engine runs here, and starting one needs root and apt"
    exit 0
  fi
  local missing=""
  command -v dockerd >/dev/null || missing="$missing docker.io"
  command -v debootstrap >/dev/null || missing="$missing debootstrap"
  if [ -n "$missing" ]; then
    say "installing$missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
  mkdir -p "$work/dockerd"
  dockerd --data-root "$work/dockerd/data" --exec-root "$work/dockerd/exec" --pidfile "$work/dockerd/pid" \
    >"$work/dockerd/log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
  say "dockerd did not start:"; tail -20 "$work/dockerd/log"; exit 1
}

# A Debian base made here (no registry is reachable), trusting the CA certificates this host trusts
# beyond the distribution's (a TLS-intercepting proxy's, a corporate CA).
base_image() {
  docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return 0
  command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
  say "making $BASE_IMAGE with debootstrap"
  local root="$work/rootfs"
  debootstrap --variant=minbase --include=ca-certificates bookworm "$root" http://deb.debian.org/debian \
    >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; exit 1; }
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$root" update-ca-certificates >/dev/null 2>&1
  tar -C "$root" -c . | docker import - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
}

# The CPU torch wheel this machine's pip picks, served to the build on loopback.
build_image() {
  mkdir -p "$work/wheels"
  "$PY" -m pip download -q --no-deps -d "$work/wheels" "torch==$TORCH_VERSION"
  local port
  port="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  "$PY" -m http.server --bind 127.0.0.1 --directory "$work/wheels" "$port" >/dev/null 2>&1 &
  http_pid=$!
  say "building $IMAGE (torch $(ls "$work/wheels"), ops for the CPU accelerator)"
  docker build --network host -f docker/Dockerfile -t "$IMAGE" \
    --build-arg BASE="$BASE_IMAGE" --build-arg DS_ACCELERATOR=cpu \
    --build-arg TORCH_PIP_ARGS="--find-links http://127.0.0.1:$port/" . >"$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log"; exit 1; }
  grep "check-ops:" "$work/build.log" | tail -1
  kill "$http_pid"; http_pid=""
}

run() { docker run --label "$RUN_ID" "$@"; }

check_help_and_worker_refusal() {
  run --rm "$IMAGE" | grep -q "^usage: entrypoint.sh worker | head" || { say "FAIL: help"; exit 1; }
  local out status=0
  out="$(run --rm "$IMAGE" worker 2>&1)" || status=$?
  if [ "$status" = 0 ] || ! grep -q "needs the head node's public key" <<<"$out"; then
    say "FAIL: a worker without a key: status $status: $out"; exit 1
  fi
  say "ok: help; a worker without a key stops (status $status)"
}

# The README's lines, on a network of their own: a worker, then the head, which trains as well.
start_nodes() {
  ssh-keygen -q -t ed25519 -N "" -C llm-ds-smoke -f "$work/id_ed25519"
  printf 'head slots=1\nworker-1 slots=1\n' >"$work/hostfile"
  docker network create --label "$RUN_ID" "$RUN_ID" >/dev/null
  docker volume create --label "$RUN_ID" "$RUN_ID" >/dev/null
  run -d --name "$RUN_ID-worker-1" --hostname worker-1 --network "$RUN_ID" --network-alias worker-1 \
    --shm-size 1g --stop-timeout 120 -v "$work/id_ed25519.pub:/run/secrets/authorized_keys:ro" -v "$RUN_ID:/runs" \
    "$IMAGE" worker >/dev/null
}

head_args=(--hostfile /run/hostfile --ssh_port 2222 --ds_config ds_configs/zero2.json
  --set data.cache_dir=/runs/cache --set train.warmup_steps=5 --set logging.log_interval=5)

run_head() {  # run_head NAME [docker run options] -- [launch arguments]
  local name="$1"; shift
  local opts=()
  while [ "$1" != "--" ]; do opts+=("$1"); shift; done; shift
  run --name "$RUN_ID-$name" --hostname head --network "$RUN_ID" --network-alias head --shm-size 1g --stop-timeout 120 \
    -v "$work/id_ed25519.pub:/run/secrets/authorized_keys:ro" -v "$work/id_ed25519:/run/secrets/ssh_key:ro" \
    -v "$work/hostfile:/run/hostfile:ro" -v "$RUN_ID:/runs" "${opts[@]}" "$IMAGE" head "${head_args[@]}" "$@"
}

read_back() { run --rm -v "$RUN_ID:/runs" "$IMAGE" cat "$1"; }

check_two_node_job() {
  say "two-node job: head + worker-1, 1 CPU rank each, ZeRO-2, 20 steps"
  run_head train -- --set train.max_steps=20 --set train.output_dir=/runs/train >"$work/train.log" 2>&1 \
    || { tail -60 "$work/train.log"; say "FAIL: the two-node job"; exit 1; }
  read_back /runs/train/summary.json >"$work/summary.json"
  "$PY" - "$work/summary.json" <<'PYEOF' || { tail -40 "$work/train.log"; exit 1; }
import json, sys
s = json.load(open(sys.argv[1]))
assert s["world_size"] == 2 and s["steps"] == 20, s
assert s["final_eval_loss"] < s["first_train_loss"] - 0.5, (s["first_train_loss"], s["final_eval_loss"])
print(f"[docker-smoke] ok: 2 ranks on 2 containers, loss {s['first_train_loss']:.3f} -> eval {s['final_eval_loss']:.3f}")
PYEOF
  grep -q "worker-1" "$work/train.log" || { say "FAIL: nothing ran on worker-1"; exit 1; }
}

check_docker_stop() {
  say "docker stop on the head while the job trains"
  run_head stop -d -- --set train.max_steps=100000 --set train.output_dir=/runs/stop \
    --set checkpoint.interval=0 --set train.eval_interval=0 >/dev/null
  for _ in $(seq 240); do
    docker exec "$RUN_ID-stop" test -s /runs/stop/metrics.jsonl 2>/dev/null && break
    [ "$(docker inspect -f '{{.State.Running}}' "$RUN_ID-stop")" = true ] || break
    sleep 1
  done
  sleep 3
  docker stop "$RUN_ID-stop" >/dev/null  # waits the container's --stop-timeout
  local status
  status="$(docker inspect -f '{{.State.ExitCode}}' "$RUN_ID-stop")"
  docker logs "$RUN_ID-stop" >"$work/stop.log" 2>&1
  read_back /runs/stop/summary.json >"$work/stop.json" 2>/dev/null || true
  read_back /runs/stop/checkpoints/latest >"$work/stop.latest" 2>/dev/null || true
  "$PY" - "$work/stop.json" "$work/stop.latest" "$status" <<'PYEOF' || { tail -60 "$work/stop.log"; exit 1; }
import json, sys
status = int(sys.argv[3])
assert status == 0, f"the head container exited {status}"
s = json.load(open(sys.argv[1]))
latest = open(sys.argv[2]).read().strip()
assert s.get("stopped_by") == "SIGTERM" and s["steps"] < 100000, s
assert latest == f"global_step{s['steps']}", (latest, s["steps"])
print(f"[docker-smoke] ok: docker stop -> checkpoint {latest}, status 0")
PYEOF
}

engine
base_image
build_image
check_help_and_worker_refusal
start_nodes
check_two_node_job
check_docker_stop
say "passed"
