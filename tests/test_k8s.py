"""deploy/k8s/: every manifest validates offline against the Kubernetes schemas
(kubernetes-validate), and what the manifests promise matches the service and its container."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.34"  # a current release; kubernetes-validate bundles its schemas


def documents():
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.relative_to(K8S), doc


def by_kind(kind: str) -> list:
    return [(p, d) for p, d in documents() if d["kind"] == kind]


@pytest.mark.parametrize("path, doc", [pytest.param(p, d, id=f"{p}:{d['kind']}") for p, d in documents()
                                       if d["kind"] != "Kustomization"])
def test_manifest_validates_against_the_kubernetes_schema(path, doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_kustomization_lists_the_cpu_manifests():
    (_, kust), = by_kind("Kustomization")
    assert all((K8S / r).is_file() for r in kust["resources"])
    assert {"deployment.yaml", "service.yaml", "pdb.yaml", "hpa.yaml"} == set(kust["resources"])


def container(doc) -> dict:
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    return c


def test_probes_ports_and_image_match_the_service_and_its_container():
    from serving.service import app

    routes = set(app.openapi()["paths"]) | {"/readyz", "/livez", "/metrics"}  # BentoML's own
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    script = (ROOT / "scripts" / "container.sh").read_text()
    image = re.search(r"IMAGE=\$\{NIN_IMAGE:-([^}]+)\}", script).group(1)
    deployments = by_kind("Deployment")
    assert len(deployments) == 2
    for path, d in deployments:
        c = container(d)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": 3000}  # BentoServer's port, EXPOSEd by the image
        for probe, route in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
            assert c[probe]["httpGet"] == {"path": route, "port": "http"} and route in routes, (path, probe)
        assert c["image"].split(":")[0] == image.split(":")[0]
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert d["spec"]["replicas"] >= 2 and d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    cpu = dict(deployments)[Path("deployment.yaml")]
    assert container(cpu)["image"] == image
    # the image serves the model packed into its bento (by tag): nothing points it elsewhere
    assert "envs" not in bentofile and all("NIN_MODEL" not in {e["name"] for e in container(d).get("env", [])}
                                           for _, d in deployments)
    gpu = container(dict(deployments)[Path("gpu/deployment-gpu.yaml")])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1 and gpu["image"].endswith(":gpu")


def test_grace_period_covers_pre_stop_and_the_drain_bound():
    from serving.drain import Drain

    for path, d in by_kind("Deployment"):
        c, pod = container(d), d["spec"]["template"]["spec"]
        env = {e["name"]: float(e["value"]) for e in c["env"] if e["name"].startswith("NIN_") and e["value"][0].isdigit()}
        drain = Drain(env["NIN_DRAIN_SECONDS"], env["NIN_SHUTDOWN_TIMEOUT"])
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain.bound_s, path


def test_services_and_pdb_select_the_deployments_pods():
    labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for _, d in by_kind("Deployment")}
    for _, svc in by_kind("Service"):
        assert any(svc["spec"]["selector"].items() <= pod.items() for pod in labels.values())
        assert svc["spec"]["ports"][0]["targetPort"] == "http"
    (_, pdb), = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels["nin-fashion-mnist"].items()
    for _, hpa in by_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] == "nin-fashion-mnist" and hpa["spec"]["minReplicas"] >= 2


def test_queue_metric_of_the_autoscaling_recipe_exists():
    from serving import http

    assert http.IN_SYSTEM._name == "nin_images_in_service"
    text = (K8S / "queue-autoscaling" / "adapter-rules.yaml").read_text()
    assert "nin_images_in_service" in text


def test_the_validator_catches_a_broken_manifest():
    import kubernetes_validate

    (_, d), = [(p, d) for p, d in by_kind("Deployment") if p.name == "deployment.yaml"]
    broken = yaml.safe_load(yaml.safe_dump(d))
    container(broken)["readinessProbe"]["httpGet"]["paht"] = "/readyz"  # a typo strict mode must reject
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(d))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_the_ingress_reaches_the_service_and_buffers_whole_bodies_up_to_the_service_s_cap():
    """ingress-nginx's own default body limit (1m) would answer a 2 MB phone photo with nginx's
    HTML 413; the service takes up to NIN_MAX_BYTES and buffering keeps slow uploads in nginx."""
    from serving.engine import Settings

    (path, ing), = by_kind("Ingress")
    assert path.parts[0] == "ingress" and "ingress" not in str(yaml.safe_load((K8S / "kustomization.yaml").read_text()))
    (_, svc), = [(p, d) for p, d in by_kind("Service") if d["metadata"]["name"] == "nin-fashion-mnist"]
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == svc["metadata"]["name"] and backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
    notes = ing["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "on"
    size = re.fullmatch(r"(\d+)m", notes["nginx.ingress.kubernetes.io/proxy-body-size"])
    assert size and int(size.group(1)) * 2**20 >= Settings().max_bytes  # the default cap
