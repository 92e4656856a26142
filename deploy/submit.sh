#!/usr/bin/env bash
# Submit a `metalstm` command to a Ray cluster as a Ray job, shipping this repository as the working dir.
#
#   deploy/submit.sh train --config configs/tiny.yaml [key=value ...]
#   deploy/submit.sh --no-wait --submission-id tiny-1 -- train --config configs/tiny.yaml
#
# Everything before a `--` goes to `ray job submit` (--no-wait, --submission-id ID, --entrypoint-num-cpus N,
# --metadata-json ..., --headers ...); everything after it (or everything, without `--`) is the metalstm
# command. Relative paths in the command are relative to the repository root, which is the job's cwd.
#
# Environment:
#   RAY_ADDRESS            the cluster's dashboard, default http://127.0.0.1:8265
#   RAY_AUTH_TOKEN         the cluster's token (or RAY_AUTH_TOKEN_PATH, a file holding it, or ~/.ray/auth_token);
#                          when one is found and RAY_AUTH_MODE is unset, token mode is switched on for the client
#   MLFLOW_TRACKING_URI    copied into the job's runtime_env (the job then logs there)
#   METALSTM_RUNTIME_ENV   the runtime_env file, default deploy/runtime_env.yaml
#   PYTHON                 the interpreter that has ray installed, default python3
# Exit status: that of `ray job submit` (0 = the job SUCCEEDED when waiting; 1 = it failed), 2 on a usage error.
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "submit.sh: error: $*" >&2; exit 2; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
runtime_env="${METALSTM_RUNTIME_ENV:-$repo/deploy/runtime_env.yaml}"
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"

submit_opts=()
if [[ " $* " == *" -- "* ]]; then
  while [[ $# -gt 0 && "$1" != "--" ]]; do submit_opts+=("$1"); shift; done
  shift  # the --
fi
case "${1:-}" in
  ""|-h|--help) usage; [[ -n "${1:-}" ]] && exit 0 || exit 2 ;;
  -*) die "expected a metalstm command (train, tasks, experiment, ...) before '$1'; ray job submit options go before a '--'" ;;
esac
command -v ray >/dev/null || die "the ray CLI is not on PATH (pip install 'ray[default]')"
[[ -f "$runtime_env" ]] || die "runtime_env file $runtime_env does not exist (METALSTM_RUNTIME_ENV)"

# Ray >= 2.52 token authentication: the CLI sends `Authorization: Bearer <token>` only in token mode. A token
# sent to a cluster without authentication is ignored, so switching the mode on whenever a token exists is safe.
if [[ -z "${RAY_AUTH_MODE:-}" ]] && { [[ -n "${RAY_AUTH_TOKEN:-}" ]] || [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]] \
    || [[ -f "$HOME/.ray/auth_token" ]]; }; then
  export RAY_AUTH_MODE=token
fi
if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" && ! -r "$RAY_AUTH_TOKEN_PATH" ]]; then
  die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is not a readable file"
fi

# The runtime_env file plus MLFLOW_TRACKING_URI, as JSON (one of --runtime-env / --runtime-env-json may be given).
runtime_env_json="$("$PYTHON" - "$runtime_env" <<'PY'
import json, os, sys
import yaml
env = yaml.safe_load(open(sys.argv[1])) or {}
if not isinstance(env, dict):
    sys.exit(f"submit.sh: error: {sys.argv[1]}: expected a mapping of runtime_env fields")
if os.environ.get("MLFLOW_TRACKING_URI"):
    env.setdefault("env_vars", {}).setdefault("MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])
print(json.dumps(env))
PY
)"

cd "$repo"
echo "submit.sh: submitting 'metalstm $*' to $RAY_ADDRESS (auth: ${RAY_AUTH_MODE:-disabled})" >&2
exec ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$runtime_env_json" \
  ${submit_opts[@]+"${submit_opts[@]}"} -- python -m pipeline.cli "$@"
