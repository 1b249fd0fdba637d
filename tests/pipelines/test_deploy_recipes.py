"""The deployment recipes in deploy/ are loaded and checked offline: no SLURM, Kubernetes or
Docker is needed (nor used). SLURM: the dask-jobqueue config builds real SLURMClusters on
loopback and their job scripts are inspected; the sbatch script runs against stand-in `srun`
and `dask` commands. Kubernetes: the manifests are validated against the CRD schemas shipped
with dask-kubernetes and the Kubernetes client's models, then cross-checked. Dockerfiles: a
structural check against pyproject.toml."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lplr_dask.cluster import NANNY_KEEP_MALLOC_ENV

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SLURM = DEPLOY / "slurm"
K8S = DEPLOY / "kubernetes"
LOOPBACK = {"host": "127.0.0.1", "port": 0, "dashboard_address": ":0"}


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# --------------------------------------------------------------------------------------------
# SLURM: dask-jobqueue config and launcher
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launcher():
    """deploy/slurm/cluster.py as a module (it is a script, not part of the package)."""
    pytest.importorskip("dask_jobqueue")
    spec = importlib.util.spec_from_file_location("lplr_deploy_slurm_cluster", SLURM / "cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sections(launcher):
    return launcher.load_config(SLURM / "jobqueue.yaml")


def _job_script(launcher, sections, section, **kwargs):
    import dask.config

    with launcher.use_config(sections):
        cluster = launcher.build_cluster(section, scheduler_options=LOOPBACK, **kwargs)
        try:
            assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
            script = cluster.job_script()
            (spec,) = cluster.new_worker_spec().values()
        finally:
            cluster.close()
    assert dask.config.get(f"jobqueue.{section}", None) is None  # config put back
    return script, spec


def _worker_command(script: str) -> list[str]:
    (line,) = [ln for ln in script.splitlines() if " -m " in ln]
    return shlex.split(line, posix=False)


def _options(argv: list[str]) -> dict[str, str | None]:
    """--flag value pairs of a command line (value None for a bare flag)."""
    out, i = {}, 0
    while i < len(argv):
        if argv[i].startswith("--"):
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            out[argv[i]] = argv[i + 1] if has_value else None
            i += 2 if has_value else 1
        else:
            i += 1
    return out


def _click_options(module: str) -> set[str]:
    """Every option of a distributed CLI command (`dask worker`, `dask scheduler`)."""
    main = importlib.import_module(f"distributed.cli.{module}").main
    return {o for p in main.params for o in (*p.opts, *p.secondary_opts)}


def _seconds(walltime: str) -> int:
    h, m, s = (int(x) for x in walltime.split(":"))
    return 3600 * h + 60 * m + s


def test_jobqueue_sections_name_every_slurm_key(sections):
    """A custom section must name every key dask-jobqueue reads (no fallback to `slurm`)."""
    import dask_jobqueue

    shipped = yaml.safe_load((Path(dask_jobqueue.__file__).parent / "jobqueue.yaml").read_text())
    required = set(shipped["jobqueue"]["slurm"])
    assert set(sections) == {"lplr-cpu", "lplr-gpu"}
    for name, section in sections.items():
        assert required <= set(section), (name, sorted(required - set(section)))
        assert set(section) <= required, (name, sorted(set(section) - required))
        # deprecated aliases stay null (dask-jobqueue warns on any other value, even [])
        for old in ("extra", "env-extra", "job-extra"):
            assert section[old] is None, (name, old)
        assert section["scheduler-options"]["port"] == 8786
        assert section["scheduler-options"]["dashboard_address"] == ":8787"


def test_cpu_job_script(launcher, sections):
    from dask.utils import parse_bytes, parse_timedelta

    script, spec = _job_script(launcher, sections, "lplr-cpu")
    assert script.startswith("#!/usr/bin/env bash\n")
    for directive in (
        "#SBATCH -J lplr-dask-cpu",
        "#SBATCH -n 1",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --mem=64G",
        "#SBATCH -t 08:00:00",
        "#SBATCH --nodes=1",
    ):
        assert directive in script.splitlines(), directive
    argv = _worker_command(script)
    assert argv[1:3] == ["-m", "distributed.cli.dask_worker"]
    assert argv[3].startswith("tcp://127.0.0.1:")
    opts = _options(argv)
    assert opts["--nworkers"] == "2" and opts["--nthreads"] == "8"  # 2 × 8 = 16 cores
    assert opts["--memory-limit"] == "30.00GiB"
    assert "--nanny" in opts
    assert opts["--local-directory"] == "${TMPDIR:-/tmp}"  # expanded on the node, not here
    # workers (2 × 30 GiB) stay under what SLURM grants the job (--mem=64G)
    assert 2 * parse_bytes(opts["--memory-limit"]) < parse_bytes("64GiB")
    # workers retire before the walltime kill
    life = parse_timedelta(opts["--lifetime"]) + parse_timedelta(opts["--lifetime-stagger"])
    assert life < _seconds(sections["lplr-cpu"]["walltime"])
    # every option is one that `dask worker` accepts
    assert set(opts) <= _click_options("dask_worker"), set(opts) - _click_options("dask_worker")
    # processes is passed explicitly, so dask-jobqueue knows each job holds two workers
    assert spec["group"] == ["-0", "-1"]
    _assert_keeps_malloc(script)


def _assert_keeps_malloc(script: str) -> None:
    """The job script exports NANNY_KEEP_MALLOC_ENV before the worker command."""
    ((name, value),) = NANNY_KEEP_MALLOC_ENV.items()
    lines = script.splitlines()
    at = lines.index(f"export {name}={shlex.quote(value)}")
    assert at < next(i for i, line in enumerate(lines) if "dask_" in line or "dask " in line)


# `dask cuda worker` options in dask-cuda 26.10 (dask_cuda/cli.py), which cannot be imported
# on a machine without CUDA: the recipe must use only these.
DASK_CUDA_WORKER_OPTIONS = {
    "--scheduler-file", "--host", "--nthreads", "--name", "--memory-limit",
    "--device-memory-limit", "--rmm-pool-size", "--resources", "--dashboard-address",
    "--local-directory", "--interface", "--preload", "--death-timeout", "--pre-import",
    "--protocol", "--worker-port", "--listen-address", "--contact-address",
}  # fmt: skip


def test_gpu_job_script(launcher, sections):
    from dask.utils import parse_bytes

    script, spec = _job_script(launcher, sections, "lplr-gpu")
    lines = script.splitlines()
    assert "#SBATCH --cpus-per-task=8" in lines  # job-cpu, not cores
    assert "#SBATCH --mem=64G" in lines
    (gres,) = [ln for ln in lines if ln.startswith("#SBATCH --gres=gpu:")]
    gpus = int(gres.rsplit(":", 1)[1])
    argv = _worker_command(script)
    assert argv[1:3] == ["-m", "dask_cuda.cli"]  # `python -m dask_cuda.cli` = dask cuda worker
    opts = _options(argv)
    # one single-threaded worker per GPU, like LocalCUDACluster; dask-cuda starts one worker
    # per visible GPU, so dask-jobqueue's `processes` must equal the GPUs per job
    assert opts["--nthreads"] == "1"
    assert sections["lplr-gpu"]["processes"] == gpus
    assert "--nworkers" not in opts and "--nanny" not in opts  # dask_worker-only flags
    assert opts["--pre-import"] == "cupy"
    assert gpus * parse_bytes(opts["--memory-limit"]) < parse_bytes("64GiB")
    assert set(opts) <= DASK_CUDA_WORKER_OPTIONS, set(opts) - DASK_CUDA_WORKER_OPTIONS
    assert "group" not in spec  # one worker per job
    _assert_keeps_malloc(script)


def test_interface_reaches_the_workers(launcher, sections):
    script, _ = _job_script(launcher, sections, "lplr-cpu", interface="lo")
    assert _options(_worker_command(script))["--interface"] == "lo"


def test_launcher_prints_job_script_and_rejects_unknown_section(launcher, capsys):
    import dask.config

    rc = launcher.main(
        ["--section", "lplr-gpu", "--host", "127.0.0.1", "--port", "0", "--print-job-script"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "#SBATCH --gres=gpu:1" in out and "-m dask_cuda.cli tcp://127.0.0.1:" in out
    with pytest.raises(KeyError, match="no dask config section"):
        launcher.build_cluster("lplr-nope")
    with pytest.raises(FileNotFoundError):
        launcher.load_config(SLURM / "missing.yaml")
    assert dask.config.get("jobqueue.lplr-gpu", None) is None


FAKE_SBATCH = """#!/usr/bin/env bash
cp "$1" "$FAKE_DIR/job-$$.sh"
echo "$$" >> "$FAKE_DIR/sbatch.log"
echo "Submitted batch job $$"
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "$@" >> "$FAKE_DIR/scancel.log"
"""


def test_launcher_runs_until_sigterm_and_cancels_its_jobs(launcher, tmp_path):
    """The launcher as a script, with stand-in sbatch/scancel: it submits --jobs jobs, writes
    the address, and on SIGTERM closes the cluster, which cancels every job it submitted."""
    import signal
    import time

    if os.name != "posix":
        pytest.skip("POSIX signals and shell stand-ins")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", FAKE_SBATCH), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    address_file = tmp_path / "address"
    env = os.environ | {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_DIR": str(tmp_path),
    }
    args = ["--host", "127.0.0.1", "--port", "0", "--jobs", "2"]
    proc = subprocess.Popen(
        [sys.executable, str(SLURM / "cluster.py"), *args, "--address-file", str(address_file)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("job-*.sh"))) < 2 or not address_file.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no address or jobs after 30 s"
            time.sleep(0.1)
        address = address_file.read_text().strip()
        assert address.startswith("tcp://127.0.0.1:")
        for script in tmp_path.glob("job-*.sh"):
            assert f"-m distributed.cli.dask_worker {address} " in script.read_text()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert f"cluster: {{kind: address, address: {address}}}" in out
    submitted = sorted((tmp_path / "sbatch.log").read_text().split())
    assert len(submitted) == 2
    assert sorted((tmp_path / "scancel.log").read_text().split()) == submitted


# --------------------------------------------------------------------------------------------
# SLURM: one-allocation sbatch script
# --------------------------------------------------------------------------------------------

SBATCH = SLURM / "dask-cluster.sbatch"
FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_LOG"
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
exec "$@"
"""
FAKE_DASK = """#!/usr/bin/env bash
echo "dask $*" >> "$FAKE_LOG"
if [[ $1 != scheduler ]]; then
    echo "env PRE_SPAWN_ENVIRON=${DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON-}" >> "$FAKE_LOG"
fi
if [[ $1 == scheduler ]]; then
    while [[ $# -gt 0 ]]; do
        [[ $1 == --scheduler-file ]] && echo '{"address": "tcp://10.1.2.3:8786"}' > "$2"
        shift
    done
    exec sleep 30
fi
"""


def test_sbatch_script_syntax_and_commands():
    bash = shutil.which("bash") or pytest.skip("no bash")
    subprocess.run([bash, "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    directives = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
    assert {"--nodes=2", "--ntasks-per-node=1", "--time=08:00:00"} <= set(directives)
    assert "dask scheduler --scheduler-file" in text
    assert "dask worker --scheduler-file" in text
    assert "dask cuda worker --scheduler-file" in text
    assert text.count("srun ") >= 2


def _run_sbatch(tmp_path, **env):
    bash = shutil.which("bash") or pytest.skip("no bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("dask", FAKE_DASK)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    log = tmp_path / "log"
    base = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_LOG": str(log),
        "SLURM_JOB_ID": "42",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_CPUS_PER_TASK": "16",
        "SLURM_MEM_PER_NODE": "65536",
        "SLURM_JOB_NUM_NODES": "2",
        "TMPDIR": "/scratch",
    }
    proc = subprocess.run(
        [bash, str(SBATCH)], env=base | env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, log.read_text().splitlines()


def test_sbatch_cpu_run_with_stand_in_commands(tmp_path):
    out, log = _run_sbatch(tmp_path)
    sched = tmp_path / "dask-scheduler-42.json"
    assert json.loads(sched.read_text())["address"] == "tcp://10.1.2.3:8786"
    assert "cluster: {kind: address, address: tcp://10.1.2.3:8786}" in out
    assert (
        log[0] == f"dask scheduler --scheduler-file {sched} --port 8786 --dashboard-address :8787"
    )
    assert log[1].startswith("srun --ntasks=2 --ntasks-per-node=1 --cpus-per-task=16 dask worker")
    # 2 workers per node × 8 threads; 90% of 64 GiB split between them
    assert log[2] == (
        f"dask worker --scheduler-file {sched} --nworkers 2 --nthreads 8 "
        "--memory-limit 29491MiB --local-directory /scratch"
    )
    assert set(_options(log[0].split()[2:])) <= _click_options("dask_scheduler")
    assert set(_options(log[2].split()[2:])) <= _click_options("dask_worker")
    # the workers keep glibc's malloc thresholds, unless the user set the variable
    (keep,) = NANNY_KEEP_MALLOC_ENV.values()
    assert log[3] == f"env PRE_SPAWN_ENVIRON={keep}"
    mine = '{"OMP_NUM_THREADS": 2}'
    (tmp_path / "again").mkdir()
    _, log = _run_sbatch(tmp_path / "again", DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON=mine)
    assert log[3] == f"env PRE_SPAWN_ENVIRON={mine}"


def test_sbatch_cuda_run_with_stand_in_commands(tmp_path):
    _, log = _run_sbatch(
        tmp_path, DASK_WORKER_KIND="cuda", SLURM_GPUS_ON_NODE="4", DASK_INTERFACE="ib0"
    )
    sched = tmp_path / "dask-scheduler-42.json"
    assert log[0].endswith("--interface ib0")
    # one single-threaded worker per GPU, host memory split four ways
    assert log[2] == (
        f"dask cuda worker --scheduler-file {sched} --nthreads 1 --memory-limit 14745MiB "
        "--local-directory /scratch --interface ib0"
    )
    assert set(_options(log[2].split()[3:])) <= DASK_CUDA_WORKER_OPTIONS
    assert set(_options(log[0].split()[2:])) <= _click_options("dask_scheduler")


# --------------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------------


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]


def _strict(schema):
    """The CRD schema with unknown fields made errors (Kubernetes would silently prune them;
    `kubectl apply --validate=strict` rejects them)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validators():
    jsonschema = pytest.importorskip("jsonschema")
    dask_kubernetes = pytest.importorskip("dask_kubernetes")
    package = Path(dask_kubernetes.__file__).parent
    crds = package / "operator/deployment/helm/dask-kubernetes-operator/crds"
    out = {}
    for name in ("daskcluster.yaml", "daskworkergroup.yaml"):
        # the CRDs are large (~0.4 MB): use libyaml when PyYAML has it
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        crd = yaml.load((crds / name).read_text(), Loader=loader)
        assert crd["spec"]["group"] == "kubernetes.dask.org"
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = version["schema"]["openAPIV3Schema"]
        schema = dict(schema, properties={k: _strict(v) for k, v in schema["properties"].items()})
        out[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(schema)
    return out


def _validate_crd(validators, doc):
    assert doc["apiVersion"] == "kubernetes.dask.org/v1"
    body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
    errors = sorted(validators[doc["kind"]].iter_errors(body), key=lambda e: list(e.path))
    return ["/".join(map(str, e.path)) + ": " + e.message for e in errors]


def _core_model(doc):
    """The Kubernetes client's pydantic model for a core object (extra fields forbidden)."""
    client = pytest.importorskip("kubernetes.client")
    model = getattr(client, doc["apiVersion"].split("/")[-1].capitalize() + doc["kind"])
    if not hasattr(model, "model_validate"):
        pytest.skip("this kubernetes client has no pydantic models")
    return model


def _container(pod_spec, name):
    (c,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return c


def _opt(args, flag):
    return args[args.index(flag) + 1]


def _version_tag() -> str:
    return _pyproject()["project"]["version"]


def test_dask_manifests_validate_against_the_crds(crd_validators):
    docs = _docs("dask-cluster.yaml")
    assert [d["kind"] for d in docs] == ["DaskCluster", "DaskWorkerGroup"]
    for doc in docs:
        assert _validate_crd(crd_validators, doc) == []


def test_crd_validation_is_strict(crd_validators):
    cluster, group = _docs("dask-cluster.yaml")
    typo = copy.deepcopy(cluster)
    worker = typo["spec"]["worker"]["spec"]["containers"][0]
    worker["resource"] = worker.pop("resources")
    int_port = copy.deepcopy(cluster)
    int_port["spec"]["scheduler"]["service"]["ports"][0]["targetPort"] = 8786  # CRD: string
    int_gpu = copy.deepcopy(group)
    int_gpu["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = 1
    no_cluster = copy.deepcopy(group)
    del no_cluster["spec"]["worker"]["spec"]
    for bad in (typo, int_port, int_gpu, no_cluster):
        assert _validate_crd(crd_validators, bad) != []


def test_dask_manifests_content():
    cluster, group = _docs("dask-cluster.yaml")
    name = cluster["metadata"]["name"]
    image = f"registry.example.com/lplr-dask:{_version_tag()}"
    sched_spec = cluster["spec"]["scheduler"]["spec"]
    worker_spec = cluster["spec"]["worker"]["spec"]
    gpu_spec = group["spec"]["worker"]["spec"]

    sched = _container(sched_spec, "scheduler")
    assert sched["image"] == image
    assert sched["args"][:2] == ["dask", "scheduler"]
    assert set(_options(sched["args"][2:])) <= _click_options("dask_scheduler")
    assert _opt(sched["args"], "--port") == "8786"
    assert _opt(sched["args"], "--dashboard-address") == ":8787"
    ports = {p["name"]: p["containerPort"] for p in sched["ports"]}
    assert ports == {"tcp-comm": 8786, "http-dashboard": 8787}
    for probe in ("readinessProbe", "livenessProbe"):
        assert sched[probe]["httpGet"]["port"] in ports

    service = cluster["spec"]["scheduler"]["service"]
    assert {(p["port"], p["targetPort"]) for p in service["ports"]} == {
        (8786, "tcp-comm"),
        (8787, "http-dashboard"),
    }

    # CPU workers: threads = CPU limit, Dask's memory limit under the container's
    from dask.utils import parse_bytes

    worker = _container(worker_spec, "worker")
    assert worker["image"] == image
    assert worker["args"][:2] == ["dask", "worker"]
    assert set(_options(worker["args"][2:])) <= _click_options("dask_worker")
    assert _opt(worker["args"], "--name") == "$(DASK_WORKER_NAME)"
    limits = worker["resources"]["limits"]
    assert worker["resources"]["requests"] == limits
    assert _opt(worker["args"], "--nthreads") == limits["cpu"]
    assert parse_bytes(_opt(worker["args"], "--memory-limit")) < parse_bytes(
        limits["memory"].replace("Gi", "GiB")
    )

    # GPU worker group: same cluster, GPU image, dask cuda worker, one GPU, one thread
    assert group["spec"]["cluster"] == name
    gpu = _container(gpu_spec, "worker")
    assert gpu["image"] == image + "-gpu"
    assert gpu["args"][:3] == ["dask", "cuda", "worker"]
    assert _opt(gpu["args"], "--nthreads") == "1"
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["resources"]["requests"] == gpu["resources"]["limits"]
    assert parse_bytes(_opt(gpu["args"], "--memory-limit")) < parse_bytes(
        gpu["resources"]["limits"]["memory"].replace("Gi", "GiB")
    )
    assert set(_options(gpu["args"][3:])) <= DASK_CUDA_WORKER_OPTIONS

    # volumes: every mount names a volume of its pod; the data claim is the one defined
    (pvc,) = _docs("data-pvc.yaml")
    for pod in (worker_spec, gpu_spec):
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            assert {m["name"] for m in c["volumeMounts"]} <= set(volumes)
        claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
        assert claim == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_operator_renders_matching_scheduler_service_and_worker_env():
    """The operator's own builders: the Service selects the scheduler pods it creates, and the
    workers are pointed at port 8786 of that Service."""
    ctrl = pytest.importorskip("dask_kubernetes.operator.controller.controller")
    cluster, group = _docs("dask-cluster.yaml")
    name = cluster["metadata"]["name"]
    sched = cluster["spec"]["scheduler"]
    deployment = ctrl.build_scheduler_deployment_spec(name, sched["spec"], {}, {})
    service = ctrl.build_scheduler_service_spec(name, sched["service"], {}, {})
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["metadata"]["name"] == f"{name}-scheduler"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    for worker_group, spec in (
        (f"{name}-default", cluster["spec"]["worker"]),
        (group["metadata"]["name"], group["spec"]["worker"]),
    ):
        rendered = ctrl.build_worker_deployment_spec(
            worker_group, "lplr", name, "abc", spec["spec"], {}, {}
        )
        (c,) = rendered["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert (
            env["DASK_SCHEDULER_ADDRESS"] == f"tcp://{name}-scheduler.lplr.svc.cluster.local:8786"
        )
        assert env["DASK_WORKER_NAME"].startswith(worker_group)
    # the pod specs are also valid Kubernetes pod specs
    model = _core_model({"apiVersion": "v1", "kind": "PodSpec"})
    for spec in (sched["spec"], cluster["spec"]["worker"]["spec"], group["spec"]["worker"]["spec"]):
        model.model_validate(spec)


def test_core_manifests_validate_against_kubernetes_models():
    docs = _docs("prefect-server.yaml") + _docs("prefect-worker.yaml") + _docs("data-pvc.yaml")
    assert [d["kind"] for d in docs] == [
        "Deployment",
        "Service",
        "Deployment",
        "PersistentVolumeClaim",
    ]
    for doc in docs:
        _core_model(doc).model_validate(doc)
    bad = copy.deepcopy(docs[1])
    bad["spec"]["selektor"] = bad["spec"].pop("selector")
    with pytest.raises(ValueError, match="selektor"):
        _core_model(bad).model_validate(bad)


def test_prefect_manifests_wiring():
    server, service = _docs("prefect-server.yaml")
    (worker,) = _docs("prefect-worker.yaml")
    image = f"registry.example.com/lplr-dask:{_version_tag()}"
    for dep in (server, worker):
        tmpl_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= tmpl_labels.items()
        for c in dep["spec"]["template"]["spec"]["containers"]:
            assert c["image"] == image
    # the Service selects the server's pods and targets its named port
    assert service["spec"]["selector"].items() <= (
        server["spec"]["template"]["metadata"]["labels"].items()
    )
    assert worker["spec"]["template"]["metadata"]["labels"].items() >= {
        ("app.kubernetes.io/name", "prefect-worker")
    }
    assert not service["spec"]["selector"].items() <= (
        worker["spec"]["template"]["metadata"]["labels"].items()
    )
    srv = _container(server["spec"]["template"]["spec"], "prefect-server")
    assert srv["command"][:3] == ["prefect", "server", "start"]
    port_names = {p["name"]: p["containerPort"] for p in srv["ports"]}
    (sport,) = service["spec"]["ports"]
    assert sport["targetPort"] in port_names
    assert port_names[sport["targetPort"]] == int(_opt(srv["command"], "--port")) == sport["port"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert srv[probe]["httpGet"]["port"] in port_names
        assert srv[probe]["httpGet"]["path"] == "/api/health"
    # the worker, and the Dask workers, report to that Service
    api_url = f"http://{service['metadata']['name']}:{sport['port']}/api"
    wrk = _container(worker["spec"]["template"]["spec"], "prefect-worker")
    assert wrk["command"][:3] == ["prefect", "worker", "start"]
    assert _opt(wrk["command"], "--type") == "process"
    assert {"name": "PREFECT_API_URL", "value": api_url} in wrk["env"]
    cluster, group = _docs("dask-cluster.yaml")
    for pod in (cluster["spec"]["worker"]["spec"], group["spec"]["worker"]["spec"]):
        assert {"name": "PREFECT_API_URL", "value": api_url} in pod["containers"][0]["env"]
    # the flows find the operator's scheduler Service and the shared volume
    env = {e["name"]: e["value"] for e in wrk["env"]}
    assert env["LPLR_SCHEDULER"] == f"tcp://{cluster['metadata']['name']}-scheduler:8786"
    mounts = {m["name"]: m["mountPath"] for m in wrk["volumeMounts"]}
    assert env["LPLR_DATA"] == mounts["data"]
    # the pool and project directory that deploy/prefect.yaml's deployments use
    cpu_image, _ = _dockerfile("Dockerfile")
    workdir = next(ln.split()[1] for ln in cpu_image if ln.startswith("WORKDIR "))
    assert env["LPLR_PROJECT_DIR"] == wrk["workingDir"] == workdir
    prefect_yaml = DEPLOY / "prefect.yaml"
    if prefect_yaml.exists():
        pools = {
            d["work_pool"]["name"] for d in yaml.safe_load(prefect_yaml.read_text())["deployments"]
        }
        assert pools == {_opt(wrk["command"], "--pool")}


# --------------------------------------------------------------------------------------------
# Dockerfiles
# --------------------------------------------------------------------------------------------


def _dockerfile(name: str) -> tuple[list[str], dict[str, str]]:
    """Instructions (continuation lines joined, comments dropped) and ARG defaults."""
    text = re.sub(r"\\\n", " ", (DEPLOY / name).read_text())
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", "\n".join(lines), flags=re.M))
    return lines, args


def _install_extras(lines: list[str]) -> set[str]:
    (install,) = [ln for ln in lines if re.match(r"RUN (uv )?pip install ", ln)]
    (extras,) = re.findall(r'"\.\[([\w,-]+)\]"', install)
    return set(extras.split(","))


def test_dockerfiles():
    from packaging.requirements import Requirement

    project = _pyproject()
    extras = set(project["project"]["optional-dependencies"])
    specs = {r.name: r.specifier for r in map(Requirement, project["project"]["dependencies"])}

    cpu, cpu_args = _dockerfile("Dockerfile")
    assert [ln for ln in cpu if ln.startswith("FROM ")] == ["FROM python:3.11-slim"]
    assert _install_extras(cpu) == {"flows", "checkpoints"} <= extras

    gpu, gpu_args = _dockerfile("Dockerfile.gpu")
    froms = [ln for ln in gpu if ln.startswith("FROM ")]
    assert froms == ["FROM ${UV_IMAGE} AS uv", "FROM ${CUDA_IMAGE}"]
    assert gpu_args["CUDA_IMAGE"].startswith("nvidia/cuda:12.")
    assert "-runtime-" in gpu_args["CUDA_IMAGE"]
    assert _install_extras(gpu) == {"flows", "checkpoints", "gpu"} <= extras
    # one Python and one dask/distributed in both images: they share a scheduler
    assert gpu_args["PYTHON_VERSION"] == "3.11"
    assert cpu_args["DASK_VERSION"] == gpu_args["DASK_VERSION"]
    assert gpu_args["DASK_VERSION"] in specs["dask"]
    assert gpu_args["DASK_VERSION"] in specs["distributed"]
    for lines in (cpu, gpu):
        install = next(ln for ln in lines if "pip install " in ln)
        for pkg in ("dask", "distributed"):
            assert f'"{pkg}==${{DASK_VERSION}}"' in install
        # what the images COPY exists in the repository, and their ignore files keep it
        for ln in lines:
            if ln.startswith("COPY ") and "--from" not in ln:
                for src in ln.split()[1:-1]:
                    assert (ROOT / src).exists(), src
    for name in ("Dockerfile", "Dockerfile.gpu"):
        ignore = [
            ln.strip()
            for ln in (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")
        ]
        assert ignore[0] == "*"  # everything else is excluded
        for keep in ("pyproject.toml", "README.md", "lplr_dask/", "pipelines/", "configs/"):
            assert f"!{keep}" in ignore


def test_readme_names_every_recipe():
    text = (DEPLOY / "README.md").read_text()
    for f in (
        "slurm/jobqueue.yaml",
        "slurm/cluster.py",
        "slurm/dask-cluster.sbatch",
        "kubernetes/dask-cluster.yaml",
        "kubernetes/prefect-server.yaml",
        "kubernetes/prefect-worker.yaml",
        "kubernetes/data-pvc.yaml",
        "Dockerfile.gpu",
        "tests/pipelines/test_deploy_recipes.py",
    ):
        assert f in text, f


def test_kubernetes_workers_keep_malloc_thresholds():
    cluster, group = _docs("dask-cluster.yaml")
    ((name, value),) = NANNY_KEEP_MALLOC_ENV.items()
    for spec in (cluster["spec"]["worker"]["spec"], group["spec"]["worker"]["spec"]):
        env = {e["name"]: e.get("value") for e in _container(spec, "worker")["env"]}
        assert env[name] == value


def test_the_recipes_variable_keeps_malloc_thresholds_in_a_real_worker():
    """What the recipes export reaches a real `dask worker` (with its nanny): the worker process
    has no MALLOC_TRIM_THRESHOLD_, and still the nanny's one-thread settings; without it, Dask
    sets the threshold (so the test would notice a Dask that stopped doing so, too)."""
    from distributed import Client, LocalCluster

    def worker_env(extra):
        # a fresh shell's environment: no Dask settings, and no MALLOC_TRIM_THRESHOLD_ (an
        # in-process nanny of an earlier test may have left it in this process's environment)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("DASK_") and k != "MALLOC_TRIM_THRESHOLD_"
        } | extra
        with LocalCluster(n_workers=0, dashboard_address=None, host="127.0.0.1") as lc:
            with Client(lc) as client:
                argv = [sys.executable, "-m", "distributed.cli.dask_worker", lc.scheduler_address,
                        "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                        "--host", "127.0.0.1"]  # fmt: skip
                proc = subprocess.Popen(
                    argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                try:
                    client.wait_for_workers(1, timeout=60)
                    (got,) = client.run(
                        lambda: {
                            k: os.environ.get(k)
                            for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")
                        }
                    ).values()
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
        return got

    assert worker_env(NANNY_KEEP_MALLOC_ENV) == {
        "MALLOC_TRIM_THRESHOLD_": None,
        "OMP_NUM_THREADS": "1",
    }
    assert worker_env({})["MALLOC_TRIM_THRESHOLD_"] is not None
