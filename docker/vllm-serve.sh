#!/usr/bin/env bash
# Entrypoint of the vllm service: serve whatever `--model LINK` points at, and restart the server
# when the link flips to a new checkpoint.
#
# Why a supervisor: vLLM loads weights once, at start-up, so a newly promoted policy needs a new
# server process. Restarting inside the container (instead of `docker restart` from the worker)
# needs no Docker socket in any container, and the GPU stays reserved by this container.
#
# Contract:
# - Arguments are `vllm serve`'s, with `--model LINK` (a symlink such as /checkpoints/current,
#   flipped atomically by docker/weights_sync.py) and `--served-model-name NAME...`.
# - Waits until LINK resolves to a directory with a config.json, then runs
#   `vllm serve <resolved dir>`: the running server is pinned to immutable files, and
#   /v1/models reports which checkpoint is live (its `root`).
# - Served names: the given NAMEs (e.g. tether-policy: "whatever is live"), plus, when
#   TETHER_VLLM_ALIAS_PREFIX is set, the checkpoint path as the worker sees it
#   (<prefix>/<path under LINK's directory>), so a client asking for one exact policy version
#   gets a 404 instead of silently sampling the previous one while a reload is in flight.
# - Polls LINK every TETHER_VLLM_POLL_S seconds; on a change it stops vLLM (SIGTERM to its process
#   group, SIGKILL after TETHER_VLLM_STOP_TIMEOUT_S) and starts it on the new target.
# - If vLLM exits on its own, this script exits with vLLM's status (1 if it was 0) and Docker's
#   restart policy starts a fresh container.
set -euo pipefail

poll_s=${TETHER_VLLM_POLL_S:-10}
stop_timeout_s=${TETHER_VLLM_STOP_TIMEOUT_S:-60}
alias_prefix=${TETHER_VLLM_ALIAS_PREFIX:-}
vllm_bin=${TETHER_VLLM_BIN:-vllm}

log() { printf '[vllm-serve] %s\n' "$*" >&2; }

link="" names=() args=()
while (($#)); do
  case $1 in
    --model) link=${2:?--model needs a path}; shift 2 ;;
    --model=*) link=${1#--model=}; shift ;;
    --served-model-name)
      shift
      while (($#)) && [[ $1 != -* ]]; do names+=("$1"); shift; done ;;
    --served-model-name=*) names+=("${1#--served-model-name=}"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
[[ -n $link ]] || { log "usage: vllm-serve.sh --model LINK [--served-model-name NAME...] [vllm serve args]"; exit 2; }
root=$(dirname -- "$link")

# The directory LINK points at, if it holds a model; nothing otherwise (not yet promoted, or a
# dangling link while a checkpoint is being replaced).
resolve() {
  local target
  target=$(readlink -f -- "$link" 2>/dev/null) || return 0
  if [[ -f $target/config.json ]]; then printf '%s\n' "$target"; fi
}

child=0
stop_child() {
  ((child)) || return 0
  # vLLM runs its engine in child processes: signal the whole group so none keeps GPU memory.
  kill -TERM -- "-$child" 2>/dev/null || kill -TERM "$child" 2>/dev/null || true
  local ticks=0  # 0.2 s each
  while kill -0 "$child" 2>/dev/null && ((ticks < stop_timeout_s * 5)); do sleep 0.2; ticks=$((ticks + 1)); done
  if kill -0 "$child" 2>/dev/null; then
    log "vLLM did not stop within ${stop_timeout_s}s; killing it"
    kill -KILL -- "-$child" 2>/dev/null || kill -KILL "$child" 2>/dev/null || true
  fi
  wait "$child" 2>/dev/null || true
  child=0
}
trap 'log "stopping"; stop_child; exit 0' TERM INT

# `sleep & wait` rather than a plain sleep, so `docker stop` interrupts the pause at once.
pause() { sleep "$1" & wait $! || true; }

target=$(resolve)
while [[ -z $target ]]; do
  log "waiting for a promoted checkpoint at $link (none yet)"
  pause "$poll_s"
  target=$(resolve)
done

while true; do
  served=("${names[@]}")
  if [[ -n $alias_prefix && $target == "$root"/* ]]; then served+=("$alias_prefix/${target#"$root"/}"); fi
  log "serving $target as ${served[*]:-<path>}"
  name_args=()
  if ((${#served[@]})); then name_args=(--served-model-name "${served[@]}"); fi
  # setsid: vLLM leads its own process group, so stop_child reaches its engine processes too.
  setsid "$vllm_bin" serve "$target" "${name_args[@]}" "${args[@]}" &
  child=$!

  while kill -0 "$child" 2>/dev/null; do
    pause "$poll_s"
    new=$(resolve)
    if [[ -n $new && $new != "$target" ]] && kill -0 "$child" 2>/dev/null; then
      log "checkpoint changed: $target -> $new; restarting vLLM"
      stop_child
      target=$new
      continue 2
    fi
  done

  rc=0
  wait "$child" || rc=$?
  log "vLLM exited with status $rc"
  exit $((rc == 0 ? 1 : rc))
done
