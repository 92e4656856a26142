"""Cluster operation end to end: a real Ray head with token authentication, `ray job submit` through
deploy/submit.sh, a model registered in MLflow by the job, `serve deploy` of deploy/serve_config.yaml, and
a real HTTP request to /v1/adapt (marked ``integration``). Plus fast checks, without a cluster, that the
deploy/ manifests parse and agree with the config schema and with deploy/serve_config.yaml.

The head runs in its own session with a dedicated --temp-dir and its own ports, so other Ray instances on
the machine are untouched; teardown kills exactly the processes this module started (never `ray stop`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SUBMIT = DEPLOY / "submit.sh"
HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
              "object-manager-port")

needs_ray_cli = pytest.mark.skipif(shutil.which("ray") is None or shutil.which("serve") is None,
                                   reason="the `ray` and `serve` CLIs are not on PATH (pip install 'ray[serve]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


# ----------------------------------------------------------------------------- manifests (no cluster, fast)


def test_runtime_env_ships_the_project_without_network():
    env = _load(DEPLOY / "runtime_env.yaml")
    for pattern in (".git", ".metalstm", "mlruns", "mlartifacts", "*.db"):
        assert pattern in env["excludes"], pattern
    # the test cluster (and a cluster whose image has the dependencies) must not install anything
    assert not {"pip", "uv", "conda", "container", "image_uri"} & set(env)
    assert "working_dir" not in env  # submit.sh ships the repository with --working-dir .


def test_kuberay_rayjob_manifest():
    job = _load(DEPLOY / "kuberay" / "rayjob-train.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["metalstm", "train", "--config"]
    cfg = load_config(REPO / argv[3], argv[4:])  # every override is a real, valid config key
    assert cfg.scaling.use_gpu and cfg.data.store.startswith("s3://")
    assert cfg.checkpoint.storage_path.startswith("s3://")  # shared by every node
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
    assert sum(g["replicas"] for g in gpu_groups) >= cfg.scaling.num_workers, "fewer GPU pods than training workers"
    containers = [c for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]] for c in g["template"]["spec"]
                  ["containers"]]
    for c in containers:
        assert c["image"] and {"cpu", "memory"} <= set(c["resources"]["limits"])
        assert "MLFLOW_TRACKING_URI" in {e["name"] for e in c.get("env", [])}
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)


def test_kuberay_rayservice_matches_the_serve_config():
    service = _load(DEPLOY / "kuberay" / "rayservice-serve.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    serve_v2 = yaml.safe_load(service["spec"]["serveConfigV2"])  # a YAML string inside the manifest
    local = _load(DEPLOY / "serve_config.yaml")
    apps, local_apps = serve_v2["applications"], local["applications"]
    assert [a["import_path"] for a in apps] == [a["import_path"] for a in local_apps]
    assert [d["name"] for d in apps[0]["deployments"]] == [d["name"] for d in local_apps[0]["deployments"]]
    assert set(apps[0].get("args", {})) <= set(local_apps[0].get("args", {}))
    user_config = apps[0]["deployments"][0]["user_config"]
    assert set(user_config) == set(local_apps[0]["deployments"][0]["user_config"])
    assert user_config["model_uri"].startswith("models:/") and user_config["tracking_uri"]
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for c in group["template"]["spec"]["containers"]:
            assert c["image"] and "MLFLOW_TRACKING_URI" in {e["name"] for e in c.get("env", [])}


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not available")
def test_submit_script_rejects_bad_usage():
    for argv, needle in (([], "Submit a `metalstm` command"), (["--no-wait"], "expected a metalstm command")):
        out = subprocess.run(["bash", str(SUBMIT), *argv], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2, out
        assert needle in out.stdout + out.stderr


# ----------------------------------------------------------------------------- a real Ray head


@dataclass
class Head:
    url: str  # the dashboard: job submission and `serve deploy`
    token: str
    env: dict[str, str]  # a client environment with token authentication
    tmp: Path

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _cluster_processes(head: subprocess.Popen, temp_dir: str) -> set[psutil.Process]:
    """The head's process tree plus anything whose command line names our temp dir (daemonised helpers)."""
    found: set[psutil.Process] = set()
    try:
        root = psutil.Process(head.pid)
        found |= {root, *root.children(recursive=True)}
    except psutil.NoSuchProcess:
        pass
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir in " ".join(proc.info["cmdline"] or []):
                found |= {proc, *proc.children(recursive=True)}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _stop_cluster(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the whole node at once (as `ray stop` would, but only ours), SIGKILL what is left after 10 s."""
    procs = _cluster_processes(head, temp_dir)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    alive = [p for p in {*alive, *_cluster_processes(head, temp_dir)} if p.is_running()]
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=10)


@contextlib.contextmanager
def start_head(num_cpus: int = 2) -> Iterator[Head]:
    """`ray start --head` on 127.0.0.1 with token authentication; stops it (and only it) on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="mlc-", dir="/tmp"))  # short: Ray puts unix sockets under it
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    ports = {name: _free_port() for name in HEAD_PORTS}
    cmd = ["ray", "start", "--head", "--block", "--temp-dir", str(tmp / "ray"), "--node-ip-address", "127.0.0.1",
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--num-cpus", str(num_cpus),
           "--object-store-memory", str(300 << 20), "--disable-usage-stats"]
    cmd += [arg for name, port in ports.items() for arg in (f"--{name}", str(port))]
    with open(tmp / "head.log", "w") as log:  # the child keeps its own descriptor
        # cwd: whatever a Ray worker writes to a relative path lands in tmp, not in the repository
        head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.time() + 90
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited with {head.returncode}:\n{(tmp / 'head.log').read_text()}")
            try:
                if requests.get(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"},
                                timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"the dashboard at {url} did not come up in 90 s")
            time.sleep(0.5)
        yield Head(url=url, token=token, env={**env, "RAY_ADDRESS": url}, tmp=tmp)
    finally:
        _stop_cluster(head, str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    with start_head() as head:
        yield head


@pytest.mark.integration
@needs_ray_cli
def test_the_cluster_requires_its_token(ray_head):
    assert requests.get(f"{ray_head.url}/api/jobs/", timeout=10).status_code == 401
    wrong = {"Authorization": f"Bearer {secrets.token_hex(32)}"}
    assert requests.get(f"{ray_head.url}/api/jobs/", headers=wrong, timeout=10).status_code == 403
    env = {**ray_head.env, "RAY_AUTH_TOKEN": "not-the-token"}
    env.pop("RAY_AUTH_MODE")  # submit.sh switches token mode on when it finds a token
    out = subprocess.run(["bash", str(SUBMIT), "--no-wait", "--", "train", "--print-config"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "403" in out.stdout + out.stderr or "Authentication failed" in out.stdout + out.stderr


def _job_status(head: Head, submission_id: str) -> dict:
    response = requests.get(f"{head.url}/api/jobs/{submission_id}", headers=head.auth(), timeout=10)
    response.raise_for_status()
    return response.json()


def _job_logs(head: Head, submission_id: str, tail: int = 8000) -> str:
    response = requests.get(f"{head.url}/api/jobs/{submission_id}/logs", headers=head.auth(), timeout=10)
    lines = [line for line in response.json().get("logs", "").splitlines() if line.strip()]
    return "\n".join(lines)[-tail:]


def _serve_config(tracking_uri: str, model_uri: str, port: int) -> dict:
    """deploy/serve_config.yaml with the test's port, model version and tracking store filled in."""
    config = _load(DEPLOY / "serve_config.yaml")
    config["http_options"].update(host="127.0.0.1", port=port)
    (app,) = config["applications"]
    for deployment in app["deployments"]:
        deployment["user_config"] = {**deployment.get("user_config", {}), "model_uri": model_uri,
                                     "tracking_uri": tracking_uri, "alias": None}
    return config


@pytest.mark.integration
@needs_ray_cli
@pytest.mark.timeout(900)
def test_submit_train_register_and_serve(ray_head, tmp_path):
    """`ray job submit` meta-trains and registers a version; `serve deploy` serves it; /v1/adapt answers."""
    from mlflow.tracking import MlflowClient

    from pipeline.tasks.builders.synthetic import build_synthetic
    from pipeline.tasks.store import read_tasks

    work = ray_head.tmp / f"run-{uuid.uuid4().hex[:8]}"  # readable by the job, the replicas and this test
    work.mkdir()
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    model_name = f"tiny-{work.name}"
    experiment = "metalstm-cluster-test"
    store = str(work / "store")  # 30 steps x 8 tasks <= 256: one pass over the data, no dataset restarts
    build_synthetic(store, layout="sequence", train_tasks=256, val_tasks=8, test_tasks=4, seed=5, window=16,
                    horizon=4, shots=5, queries=3)

    submission_id = f"metalstm-test-{work.name}"
    env = dict(ray_head.env)
    env.pop("RAY_AUTH_MODE")  # submit.sh switches token mode on from RAY_AUTH_TOKEN
    argv = ["bash", str(SUBMIT), "--submission-id", submission_id, "--", "train", "--config", "configs/tiny.yaml",
            f"data.store={store}", f"tracking.uri={tracking_uri}", f"tracking.experiment={experiment}",
            f"tracking.registered_model={model_name}", f"checkpoint.storage_path={work / 'runs'}",
            f"name=tiny-{work.name}"]
    try:  # without --no-wait the script streams the job's log and exits when the job ends
        submitted = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=480, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job did not finish in 480 s; its log ends with:\n{_job_logs(ray_head, submission_id)}")
    status = _job_status(ray_head, submission_id)
    assert submitted.returncode == 0 and status["status"] == "SUCCEEDED", (
        f"job {status['status']}: {status.get('message')}\n{_job_logs(ray_head, submission_id)}\n"
        f"{submitted.stderr[-3000:]}")
    assert status["entrypoint"].startswith("python -m pipeline.cli train --config configs/tiny.yaml")

    client = MlflowClient(tracking_uri)
    versions = client.search_model_versions(f"name = '{model_name}'")
    assert len(versions) == 1, versions
    version = versions[0]
    number = str(version.version)
    assert version.status == "READY"
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["metalstm.task_store"] == store
    assert any(k.startswith("val_post_") for k in run.data.metrics), sorted(run.data.metrics)

    port = _free_port()
    config_file = work / "serve_config.yaml"
    config_file.write_text(yaml.safe_dump(_serve_config(tracking_uri, f"models:/{model_name}/{number}",
                                                        port)))
    deployed = subprocess.run(["serve", "deploy", str(config_file), "--address", ray_head.url], env=ray_head.env,
                              capture_output=True, text=True, timeout=120)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    base = f"http://127.0.0.1:{port}"
    deadline, last = time.time() + 150, None
    while time.time() < deadline:
        try:
            last = requests.get(f"{base}/healthz", timeout=5)
            if last.status_code == 200 and last.json().get("status") == "ok":
                break
        except requests.RequestException as e:
            last = e
        time.sleep(1)
    else:
        serve_status = subprocess.run(["serve", "status", "--address", ray_head.url], env=ray_head.env,
                                      capture_output=True, text=True, timeout=60)
        pytest.fail(f"the Serve app did not become healthy: {last!r}\n{serve_status.stdout}{serve_status.stderr}")

    info = requests.get(f"{base}/v1/model", timeout=10).json()
    assert (info["name"], info["version"], info["run_id"]) == (model_name, number, version.run_id)

    task = read_tasks(store, "test", limit=1)[0]
    body = {"support": [{"x": _plain(x), "y": _plain(y)} for x, y in zip(task["support_x"], task["support_y"])],
            "query": [{"x": _plain(x)} for x in task["query_x"]]}
    response = requests.post(f"{base}/v1/adapt", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == {"name": model_name, "version": number}
    assert len(answer["predictions"]) == len(task["query_x"])
    for prediction in answer["predictions"]:
        assert len(prediction["values"]) == 4 and all(math.isfinite(v) for v in prediction["values"])
    assert answer["support_loss_after"] < answer["support_loss_before"]


def _plain(a) -> list:
    """A task-store array (numpy, possibly nested object arrays) as JSON lists."""
    return json.loads(json.dumps(a, default=lambda v: v.tolist()))
