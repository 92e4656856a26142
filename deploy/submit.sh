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
#   MLFLOW_TRACKING_URI    copied into the job's runtime_env (the job then logs there); must hold no password
#   METALSTM_RUNTIME_ENV   the runtime_env file, default deploy/runtime_env.yaml
#   PYTHON                 the interpreter that has ray installed, default python3
# Exit status: that of `ray job submit` (0 = the job SUCCEEDED when waiting; 1 = it failed), 2 on a usage error.
# Secrets: the runtime env goes to `ray job submit` in a private temporary file, never on its command line (which
# every user of this machine can read); a URL with a password, in MLFLOW_TRACKING_URI or in the command, is
# refused, since the dashboard shows a job's runtime_env and entrypoint. Give the cluster's nodes credentials
# through their own environment (a Kubernetes Secret) instead.
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

# The runtime_env file plus MLFLOW_TRACKING_URI, written as JSON (which is YAML) to a file only this user can read.
runtime_env_file="$(mktemp "${TMPDIR:-/tmp}/metalstm-runtime-env.XXXXXX")"  # mktemp creates it with mode 600
trap 'rm -f "$runtime_env_file"' EXIT
"$PYTHON" - "$runtime_env" "$runtime_env_file" "$@" <<'PY' || exit 2
import json, os, re, sys
import yaml
source, target, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
env = yaml.safe_load(open(source)) or {}
if not isinstance(env, dict):
    sys.exit(f"submit.sh: error: {source}: expected a mapping of runtime_env fields")
password = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]*:[^/@\s]+@", re.I)  # scheme://user:password@host
uri = os.environ.get("MLFLOW_TRACKING_URI", "")
for what, text in [("MLFLOW_TRACKING_URI", uri), *(("the command's argument", a) for a in argv)]:
    if password.search(text):
        sys.exit(f"submit.sh: error: {what} holds a URL with a password, which the Ray dashboard would show; "
                 "set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or other credentials) in the cluster "
                 "nodes' environment instead")
if uri:
    env.setdefault("env_vars", {}).setdefault("MLFLOW_TRACKING_URI", uri)
with open(target, "w") as f:
    json.dump(env, f)
PY

cd "$repo"
echo "submit.sh: submitting 'metalstm $*' to $RAY_ADDRESS (auth: ${RAY_AUTH_MODE:-disabled})" >&2
status=0
ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env "$runtime_env_file" \
  ${submit_opts[@]+"${submit_opts[@]}"} -- python -m pipeline.cli "$@" || status=$?
exit "$status"
