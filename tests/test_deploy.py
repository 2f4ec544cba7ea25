"""The deploy manifests parse and name entrypoints and images that this repository provides."""

import re
import shlex
import tomllib
from pathlib import Path

import yaml

from distcluster.train import config_from_args

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


def test_images_are_built_from_this_repository():
    built = {f"distcluster:{VERSION}": DEPLOY / "Dockerfile",
             "distcluster-mlflow:3": DEPLOY / "mlflow" / "Dockerfile"}
    for name, manifest in manifests().items():
        for image in images_in(manifest):
            assert image in built or image in PUBLIC_IMAGES, (name, image)
    for image, dockerfile in built.items():
        assert f"-t {image}" in dockerfile.read_text(), dockerfile  # its build command names it
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


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
    command = compose["services"]["mlflow"]["command"]
    assert re.search(r"--backend-store-uri postgresql://", command)
    assert "--artifacts-destination" in command and "--serve-artifacts" in command
    assert compose["services"]["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert compose["services"]["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
