#!/usr/bin/env bash
# Container entrypoint for cloud GPU nodes (PID 1 is tini, which passes signals to this script).
#   worker                  run sshd, so the head node's pdsh can start ranks here
#   head [launch args]      run sshd too where a key is given (the head node trains as well), then
#                           `llm-ds launch` with the given arguments (hostfile, configs, --ssh_port ...)
#   COMMAND [args]          run anything else (a shell, `llm-ds prepare`, ...)
# `docker stop` (SIGTERM) reaches this container's training ranks, which save a checkpoint at a step
# every rank agrees on and stop; the whole job stops with them. Give them time: docker stop -t 120.
# Settings: LLM_DS_AUTHORIZED_KEYS (public keys allowed in, default /run/secrets/authorized_keys),
# LLM_DS_SSH_KEY (the head's private key, default /run/secrets/ssh_key), LLM_DS_SSH_PORT (default
# 2222: the node's own sshd holds 22 under --network host), LLM_DS_SSH_DIR (default /root/.ssh).
set -euo pipefail
role="${1:-help}"
[ $# -gt 0 ] && shift
keys="${LLM_DS_AUTHORIZED_KEYS:-/run/secrets/authorized_keys}"
private_key="${LLM_DS_SSH_KEY:-/run/secrets/ssh_key}"
ssh_dir="${LLM_DS_SSH_DIR:-/root/.ssh}"
ssh_port="${LLM_DS_SSH_PORT:-2222}"
# A rank is the driver started by DeepSpeed's launch.py, which hands it --local_rank.
rank_pattern='llm_ds[./]train(\.py)? --local_rank='
sshd_pid=""

start_sshd() {
  install -d -m 700 "$ssh_dir"
  install -m 600 "$keys" "$ssh_dir/authorized_keys"
  ssh-keygen -A >/dev/null
  mkdir -p /run/sshd
  /usr/sbin/sshd -D -e -p "$ssh_port" -o PasswordAuthentication=no -o PermitRootLogin=prohibit-password \
    -o AuthorizedKeysFile="$ssh_dir/authorized_keys" -o PermitUserEnvironment=no &
  sshd_pid=$!
}

stop_ranks() {
  pkill -TERM -f "$rank_pattern" || true
  for _ in $(seq 600); do
    pgrep -f "$rank_pattern" >/dev/null || return 0
    sleep 0.2
  done
}

stop_sshd() {
  if [ -n "$sshd_pid" ]; then kill -TERM "$sshd_pid" 2>/dev/null || true; fi
}

case "$role" in
  worker)
    if [ ! -s "$keys" ]; then
      echo "entrypoint: a worker needs the head node's public key in $keys (set LLM_DS_AUTHORIZED_KEYS)" >&2
      exit 2
    fi
    start_sshd
    trap 'stop_ranks; stop_sshd' TERM INT
    wait "$sshd_pid" || wait "$sshd_pid" || true
    ;;
  head)
    if [ -s "$keys" ]; then start_sshd; fi
    if [ -s "$private_key" ]; then
      install -d -m 700 "$ssh_dir"
      install -m 600 "$private_key" "$ssh_dir/id_ed25519"
      # pdsh and the runner's own checks reach every node, this one included, on the workers' port.
      printf 'Host *\n  Port %s\n  StrictHostKeyChecking accept-new\n' "$ssh_port" > "$ssh_dir/config"
    fi
    llm-ds launch "$@" &
    launch_pid=$!
    trap 'stop_ranks' TERM INT
    status=0
    wait "$launch_pid" || status=$?
    if [ "$status" -gt 128 ] && kill -0 "$launch_pid" 2>/dev/null; then  # woken by the signal: wait on
      status=0
      wait "$launch_pid" || status=$?
    fi
    stop_sshd
    exit "$status"
    ;;
  help | --help | -h)
    echo "usage: entrypoint.sh worker | head [llm-ds launch arguments] | COMMAND [args]"
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
