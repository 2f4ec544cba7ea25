"""The deploy manifests parse and name entrypoints and images that this repository provides."""

import shlex
import tomllib
import urllib.parse
from pathlib import Path

import yaml

from distcluster.commands.train import config_from_args

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
PUBLIC_IMAGES = {"postgres:16"}  # third-party images used as they are


def images_in(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + \
            [i for v in node.values() for i in images_in(v)]
    if isinstance(node, list):
        return [i for v in node for i in images_in(v)]
    return []


def manifests() -> dict[str, object]:
    return {p.name: yaml.safe_load(p.read_text()) for p in DEPLOY.rglob("*.yaml")}


def test_every_manifest_parses():
    assert set(manifests()) == {"kuberay-rayjob.yaml", "ray-cluster.yaml", "docker-compose.yaml"}


def build_command(dockerfile: Path) -> dict[str, str]:
    """The `docker build` its header comment gives: {"file": ..., "tag": ..., "context": ...}."""
    line = next(c for c in dockerfile.read_text().splitlines() if "docker build" in c)
    argv = shlex.split(line.lstrip("# "))[2:]
    options = dict(zip(argv[:-1:2], argv[1:-1:2], strict=True))
    return {"file": options.get("-f", str((ROOT / argv[-1] / "Dockerfile").relative_to(ROOT))),
            "tag": options["-t"], "context": argv[-1]}


def test_images_are_built_from_this_repository():
    built = {build_command(d)["tag"]: d for d in (DEPLOY / "Dockerfile", DEPLOY / "mlflow" / "Dockerfile")}
    assert set(built) == {f"distcluster:{VERSION}", "distcluster-mlflow:3"}
    for tag, dockerfile in built.items():  # its build command builds this very file
        assert (ROOT / build_command(dockerfile)["file"]).resolve() == dockerfile, tag
    for name, manifest in manifests().items():
        for image in images_in(manifest):
            assert image in built or image in PUBLIC_IMAGES, (name, image)
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


def test_the_worker_image_installs_the_torch_the_makefile_pins():
    makefile = (ROOT / "Makefile").read_text()
    pinned = next(line.split(":=", 1)[1].split() for line in makefile.splitlines()
                  if line.startswith("TORCH "))
    installs = [shlex.split(line)[3:] for line in (DEPLOY / "Dockerfile").read_text().splitlines()
                if line.startswith("RUN pip install torch")]
    assert installs == [pinned]


def test_the_rayjob_entrypoint_is_a_valid_train_command():
    job = manifests()["kuberay-rayjob.yaml"]
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "distcluster.train"]
    cfg = config_from_args(argv[3:])
    assert cfg.workers == 4 and cfg.gpu
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == cfg.workers


def test_the_mlflow_server_uses_postgres_and_serves_artifacts():
    compose = manifests()["docker-compose.yaml"]
    services = compose["services"]
    argv = shlex.split(services["mlflow"]["command"])
    assert argv[:2] == ["mlflow", "server"] and "--serve-artifacts" in argv
    options = dict(zip(argv[2::2], argv[3::2], strict=False))
    uri = options["--backend-store-uri"].replace("${MLFLOW_DB_PASSWORD:-change-me}", "password")
    store = urllib.parse.urlsplit(uri)
    database = services["postgres"]["environment"]
    assert store.scheme == "postgresql" and store.hostname in services and store.port == 5432
    assert store.username == database["POSTGRES_USER"] and store.path == f"/{database['POSTGRES_DB']}"
    mounted = {volume.split(":")[1] for volume in services["mlflow"]["volumes"]}
    assert options["--artifacts-destination"] in mounted  # the artifacts live on a volume
    assert f"{options['--port']}:{options['--port']}" in services["mlflow"]["ports"]
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert (DEPLOY / "mlflow" / services["mlflow"]["build"] / "Dockerfile").is_file()
