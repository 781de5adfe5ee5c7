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


NAMESPACE = "nin-classifier"


def test_kustomizations_put_each_variant_in_its_namespace_with_its_network_policy():
    kusts = {p.parent: d for p, d in by_kind("Kustomization")}
    assert set(kusts) == {Path("."), Path("common"), Path("gpu")}
    assert kusts[Path(".")]["resources"] == ["common", "deployment.yaml", "service.yaml", "pdb.yaml", "hpa.yaml"]
    assert kusts[Path("gpu")]["resources"] == ["../common", "deployment-gpu.yaml"]
    assert kusts[Path("common")]["resources"] == ["namespace.yaml", "networkpolicy.yaml"]
    for folder, kust in kusts.items():
        assert all((K8S / folder / r).exists() for r in kust["resources"])
        if folder != Path("common"):
            assert kust["namespace"] == NAMESPACE
    (_, ns), = by_kind("Namespace")
    assert ns["metadata"]["name"] == NAMESPACE and ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # every namespaced manifest names it too: `kubectl apply -f` and checkov's raw scan see it
    for path, d in documents():
        if d["kind"] not in ("Kustomization", "Namespace", "ConfigMap"):
            assert d["metadata"].get("namespace") == NAMESPACE, path


def test_the_network_policy_admits_only_the_ingress_controller_and_prometheus_and_no_egress():
    (_, pol), = by_kind("NetworkPolicy")
    spec = pol["spec"]
    pods = [d["spec"]["template"]["metadata"]["labels"] for _, d in by_kind("Deployment")]
    assert all(spec["podSelector"]["matchLabels"].items() <= labels.items() for labels in pods)  # CPU and GPU
    assert spec["policyTypes"] == ["Ingress", "Egress"] and spec["egress"] == []
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"port": 3000, "protocol": "TCP"}]
    sources = {f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for f in rule["from"]}
    assert sources == {"ingress-nginx", "monitoring"} and all(set(f) == {"namespaceSelector"} for f in rule["from"])
    (_, adapter), = by_kind("ConfigMap")
    assert adapter["metadata"]["namespace"] == "monitoring"  # where the policy expects Prometheus


def test_pods_are_locked_down_with_writable_mounts_only_where_bentoml_writes():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "ENV BENTOML_HOME=/var/lib/bentoml/" in dockerfile
    for path, d in by_kind("Deployment"):
        pod, c = d["spec"]["template"]["spec"], container(d)
        assert pod["automountServiceAccountToken"] is False, path
        assert pod["securityContext"]["runAsUser"] >= 10000 and pod["securityContext"]["runAsGroup"] >= 10000
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "privileged": False,
                                        "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True}, path
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        writable = {m for m, v in mounts.items() if not v.get("readOnly")}
        assert writable == {"/tmp", "/var/lib/bentoml"}, path  # tests/test_container.py runs the image so
        assert all("emptyDir" in volumes[mounts[m]["name"]] for m in writable)
        keys = volumes[mounts["/var/run/secrets/nin"]["name"]]["secret"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert keys["secretName"] == "nin-api-keys" and env["NIN_API_KEYS_FILE"] == "/var/run/secrets/nin/keys"
    script = (ROOT / "scripts" / "container.sh").read_text()
    assert "BENTO_USER_UID=10034" in script and "runAsUser: 10034" in (K8S / "deployment.yaml").read_text()


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

    from serving.service import app

    (path, ing), = by_kind("Ingress")
    assert path.parts[0] == "ingress" and "ingress" not in str(yaml.safe_load((K8S / "kustomization.yaml").read_text()))
    (_, svc), = [(p, d) for p, d in by_kind("Service") if d["metadata"]["name"] == "nin-fashion-mnist"]
    paths = ing["spec"]["rules"][0]["http"]["paths"]
    for p in paths:
        backend = p["backend"]["service"]
        assert backend["name"] == svc["metadata"]["name"] and backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
    # the API, the page and the docs reach the public; /metrics and the probes stay inside
    routed = {p["path"] for p in paths}
    api = set(app.openapi()["paths"]) | {"/api/classify", "/api/classify_batch"}
    for route in api:
        assert any(route == r or route.startswith(r.rstrip("/") + "/") for r in routed if r != "/"), route
    for inside in ("/metrics", "/livez", "/readyz", "/schema.json"):
        assert not any(inside == r or inside.startswith(r + "/") for r in routed), inside
    notes = ing["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "on"
    size = re.fullmatch(r"(\d+)m", notes["nginx.ingress.kubernetes.io/proxy-body-size"])
    assert size and int(size.group(1)) * 2**20 >= Settings().max_bytes  # the default cap
