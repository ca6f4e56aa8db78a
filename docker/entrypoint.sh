#!/usr/bin/env bash
# Container entrypoint for cloud GPU nodes.
#   worker                  run sshd in the foreground, so the head node's pdsh can start ranks here
#   head [launch args]      run `llm-ds launch` with the given arguments (hostfile, configs, ...)
#   COMMAND [args]          run anything else (a shell, `llm-ds prepare`, ...)
# Worker settings: LLM_DS_AUTHORIZED_KEYS (the head node's public key, default
# /run/secrets/authorized_keys), LLM_DS_SSH_PORT (default 22), LLM_DS_SSH_DIR (default /root/.ssh).
set -euo pipefail
role="${1:-help}"
[ $# -gt 0 ] && shift
case "$role" in
  worker)
    keys="${LLM_DS_AUTHORIZED_KEYS:-/run/secrets/authorized_keys}"
    ssh_dir="${LLM_DS_SSH_DIR:-/root/.ssh}"
    if [ ! -s "$keys" ]; then
      echo "entrypoint: a worker needs the head node's public key in $keys (set LLM_DS_AUTHORIZED_KEYS)" >&2
      exit 2
    fi
    install -d -m 700 "$ssh_dir"
    install -m 600 "$keys" "$ssh_dir/authorized_keys"
    ssh-keygen -A >/dev/null
    mkdir -p /run/sshd
    exec /usr/sbin/sshd -D -e -p "${LLM_DS_SSH_PORT:-22}" -o PasswordAuthentication=no \
      -o PermitRootLogin=prohibit-password -o AuthorizedKeysFile="$ssh_dir/authorized_keys"
    ;;
  head)
    exec llm-ds launch "$@"
    ;;
  help | --help | -h)
    echo "usage: entrypoint.sh worker | head [llm-ds launch arguments] | COMMAND [args]"
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
