"""deploy/: the KubeRay manifests run restricted pods and require the serving token's Secret; no secret travels
in a runtime_env or on a command line (submit.sh, run for real against a recording `ray` on PATH)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.serving.adapter_cache import STORE_DEPLOYMENT
from pipeline.serving.middleware import TOKEN_ENV, is_loopback

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
MANIFESTS = sorted((DEPLOY / "kuberay").glob("*.yaml"))
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|ACCESS_KEY", re.I)
PASSWORD_URL = re.compile(r"://[^/@\s:]*:[^/@\s]+@")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _pod_specs(node: Any) -> list[dict]:
    """Every pod spec in a manifest: any mapping with a ``containers`` list (head, worker groups, submitter)."""
    if isinstance(node, list):
        return [spec for item in node for spec in _pod_specs(item)]
    if not isinstance(node, dict):
        return []
    found = [node] if isinstance(node.get("containers"), list) else []
    return found + [spec for value in node.values() for spec in _pod_specs(value)]


def _serve_configs() -> list[tuple[str, dict]]:
    service = _load(DEPLOY / "kuberay" / "rayservice-serve.yaml")
    return [("serve_config.yaml", _load(DEPLOY / "serve_config.yaml")),
            ("rayservice serveConfigV2", yaml.safe_load(service["spec"]["serveConfigV2"]))]


def test_manifests_are_found():
    assert {p.name for p in MANIFESTS} >= {"rayjob-train.yaml", "rayservice-serve.yaml"}
    counts = {p.name: len(_pod_specs(_load(p))) for p in MANIFESTS}
    assert counts["rayjob-train.yaml"] >= 3 and counts["rayservice-serve.yaml"] >= 2, counts  # submitter included


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_pod_runs_restricted(path):
    for spec in _pod_specs(_load(path)):
        pod = spec.get("securityContext") or {}
        assert pod.get("runAsNonRoot") is True and int(pod.get("runAsUser", 0)) > 0, pod
        assert (pod.get("seccompProfile") or {}).get("type") == "RuntimeDefault", pod
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in [*spec["containers"], *spec.get("initContainers", [])]:
            sc = c.get("securityContext") or {}
            where = f"{path.name}: container {c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert "ALL" in (sc.get("capabilities") or {}).get("drop", []), where
            assert not (sc.get("capabilities") or {}).get("add") and not sc.get("privileged"), where
            assert sc.get("runAsNonRoot", True) is True and sc.get("runAsUser", 1) != 0, where
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{where}: /tmp must be a writable emptyDir"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_secrets_come_from_secrets_only(path):
    manifest = _load(path)
    for spec in _pod_specs(manifest):
        for c in [*spec["containers"], *spec.get("initContainers", [])]:
            for env in c.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), (path.name, env)
                assert not PASSWORD_URL.search(str(env.get("value", ""))), (path.name, env)
    runtime_env = yaml.safe_load(manifest["spec"].get("runtimeEnvYAML") or "{}") or {}
    assert not any(SECRET_NAME.search(k) for k in runtime_env.get("env_vars", {})), runtime_env


def test_the_serving_token_secret_is_required():
    """A missing Secret must stop the pods, not start them without a token on 0.0.0.0."""
    service = _load(DEPLOY / "kuberay" / "rayservice-serve.yaml")
    serve_v2 = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert not is_loopback(serve_v2["http_options"]["host"])  # why the token matters here
    token_env = serve_v2["applications"][0]["args"]["token_env"]
    assert token_env == TOKEN_ENV
    specs = _pod_specs(service["spec"]["rayClusterConfig"])
    for spec in specs:
        for c in spec["containers"]:
            (token,) = [e for e in c.get("env", []) if e["name"] == token_env]
            ref = token["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"] and ref.get("optional", False) is False, ref


def test_serve_configs_carry_no_secret_and_share_adapters():
    runtime_env = _load(DEPLOY / "runtime_env.yaml")
    assert not any(SECRET_NAME.search(k) for k in runtime_env.get("env_vars", {})), runtime_env
    for name, config in _serve_configs():
        for app in config["applications"]:
            assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", app["args"]["token_env"]), name  # a variable's name
            env_vars = (app.get("runtime_env") or {}).get("env_vars", {})
            assert not any(SECRET_NAME.search(k) for k in env_vars), (name, env_vars)
            for d in app.get("deployments", []):
                assert not SECRET_NAME.search(str((d.get("ray_actor_options") or {}).get("runtime_env", ""))), name
                assert not PASSWORD_URL.search(str((d.get("user_config") or {}).get("tracking_uri", ""))), name
                if d["name"] == STORE_DEPLOYMENT:  # listing the adapter store is allowed, scaling it is not
                    assert d.get("num_replicas", 1) == 1, name
    service_apps = _serve_configs()[1][1]["applications"]
    assert service_apps[0]["deployments"][0]["num_replicas"] > 1  # the case the shared store exists for


# ----------------------------------------------------------------------------- submit.sh


RECORDING_RAY = """#!/bin/sh
# records how submit.sh called it: the arguments, and the --runtime-env file's content and mode
printf '%s\\n' "$@" > "$RECORD/argv"
prev=""
for a in "$@"; do
  if [ "$prev" = "--runtime-env" ]; then cp "$a" "$RECORD/runtime_env"; stat -c %a "$a" > "$RECORD/mode"; fi
  prev="$a"
done
exit 0
"""


@pytest.fixture
def recording_ray(tmp_path):
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    ray = bin_dir / "ray"
    ray.write_text(RECORDING_RAY)
    ray.chmod(ray.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record), "TMPDIR": str(tmp_path),
           "RAY_ADDRESS": "http://127.0.0.1:1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env, record, tmp_path


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not available")
def test_submit_keeps_the_runtime_env_off_the_command_line(recording_ray):
    env, record, tmp = recording_ray
    uri = "http://mlflow.internal:5000"
    out = subprocess.run(["bash", str(DEPLOY / "submit.sh"), "train", "--config", "configs/tiny.yaml"],
                         env={**env, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    argv = (record / "argv").read_text().splitlines()
    assert "--runtime-env" in argv and "--runtime-env-json" not in argv and not any(uri in a for a in argv)
    assert yaml.safe_load((record / "runtime_env").read_text())["env_vars"]["MLFLOW_TRACKING_URI"] == uri
    assert (record / "mode").read_text().strip() == "600"  # readable by this user only
    assert not list(tmp.glob("metalstm-runtime-env.*"))  # and removed afterwards


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not available")
def test_submit_refuses_passwords_in_urls(recording_ray):
    env, record, _ = recording_ray
    cases = [({"MLFLOW_TRACKING_URI": "https://me:pw@mlflow:5000"}, ["train", "--config", "configs/tiny.yaml"]),
             ({}, ["train", "--config", "configs/tiny.yaml", "tracking.uri=http://me:pw@mlflow:5000"])]
    for extra, argv in cases:
        out = subprocess.run(["bash", str(DEPLOY / "submit.sh"), *argv], env={**env, **extra}, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2 and "password" in out.stderr, out
        assert not (record / "argv").exists()  # nothing was submitted
