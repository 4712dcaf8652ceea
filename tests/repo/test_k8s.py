"""The KubeRay manifests in k8s/ against the real KubeRay v1.7.0 CRDs, Kubernetes' own rules for
core objects, and the project they deploy (the Serve app, the sweep config, the image, monitoring).

No cluster is needed. The CRDs' openAPIV3Schema are JSON Schemas, made strict here (an unknown field
fails, as with `kubectl apply --validate=strict`); what the API server does beyond the schema (CRD
defaults, list-type uniqueness, every CEL rule) is done by k8s_apiserver.py on every Ray object,
including the RayClusters that KubeRay creates from the RayJob and the RayService; the operator's own
semantic checks that neither can express are restated next to them.
"""
from __future__ import annotations

import base64
import copy
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from jsonschema import Draft7Validator

from k8s_apiserver import CustomResourceDefinition, Rule

if TYPE_CHECKING:
    from po_cluster.config import SweepConfig
    from po_cluster.serving.args import AppConfig

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# KubeRay v1.7.0's CRDs, vendored in the repository (k8s/crds/README.md).
CRD_DIR = K8S / "crds"
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml")
MANIFESTS = ("rayjob-sweep.yaml", "rayservice.yaml", "secrets.example.yaml", "redis.yaml", "configmaps.yaml")
SECRETS_FILE = "secrets.example.yaml"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 60k lines

DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = rf"^{DNS1123_LABEL}(\.{DNS1123_LABEL})*$"
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
QUALIFIED_NAME = rf"^({DNS1123_LABEL}(\.{DNS1123_LABEL})*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
_DECIMAL = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
QUANTITY = rf"^(\+|-)?{_DECIMAL}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{_DECIMAL}))?$"  # resource.Quantity
PORT_NAME = r"^(?=.{1,15}$)(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # IANA_SVC_NAME: a named port
CONFIG_KEY = r"^[-._a-zA-Z0-9]+$"  # keys of Secret and ConfigMap data
SWEEP_CONFIG = ROOT / "configs" / "sweep-gpu.yaml"  # what k8s/configmaps.yaml holds for the RayJob
KUBERAY_MAX_NAME = 47  # RayJob / RayService: a RayCluster name (≤ 53) minus the 6 characters KubeRay appends


# ---- schemas ----------------------------------------------------------------------------------


def strict_schema(node: Any) -> Any:
    """A CRD's structural schema as a strict JSON Schema.

    Kubernetes prunes (or, validating strictly, rejects) fields a schema does not declare; JSON
    Schema allows them unless told: add `additionalProperties: false` wherever `properties` are
    declared and unknown fields are not explicitly preserved. int-or-string becomes an anyOf.
    """
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: ({name: strict_schema(sub) for name, sub in value.items()} if key == "properties"
                 else strict_schema(value))
           for key, value in node.items() if not key.startswith("x-kubernetes-") and key != "nullable"}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("format") == "int32":
        out.setdefault("minimum", -(2 ** 31))
        out.setdefault("maximum", 2 ** 31 - 1)
    if node.get("nullable"):
        return {"anyOf": [out, {"type": "null"}]}
    return out


def object_meta(name_pattern: str, max_length: int) -> dict:
    """ObjectMeta as a manifest writes it (the CRDs leave metadata open; the API server does not)."""
    strings = {"type": "object", "additionalProperties": {"type": "string"}}
    return {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": name_pattern, "maxLength": max_length},
        "namespace": {"type": "string", "pattern": f"^{DNS1123_LABEL}$", "maxLength": 63},
        "labels": {**strings, "propertyNames": {"pattern": QUALIFIED_NAME},
                   "additionalProperties": {"type": "string", "pattern": LABEL_VALUE}},
        "annotations": {**strings, "propertyNames": {"pattern": QUALIFIED_NAME}}}}


def _data_map(value_schema: dict) -> dict:
    return {"type": "object", "propertyNames": {"pattern": CONFIG_KEY, "maxLength": 253},
            "additionalProperties": value_schema}


def _closed(required: list[str] | None = None, **properties: Any) -> dict:
    return {"type": "object", "additionalProperties": False, "required": required or [], "properties": properties}


def core_schemas(pod_template: dict) -> dict[tuple[str, str], dict]:
    """Schemas of the core kinds the manifests hold, by Kubernetes' own rules: the fields these
    manifests may use, closed (a misspelling fails). A Deployment's pod template is the real one,
    PodTemplateSpec as the KubeRay CRDs carry it (generated from Kubernetes' own types)."""
    def kind(name: str, api_version: str = "v1", name_pattern: str = DNS1123_SUBDOMAIN, **fields: dict) -> dict:
        return {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata"],
                "properties": {"apiVersion": {"const": api_version}, "kind": {"const": name},
                               "metadata": object_meta(name_pattern, 253 if name_pattern == DNS1123_SUBDOMAIN else 63),
                               **fields}}

    base64_value = {"type": "string", "pattern": BASE64}
    labels = {"type": "object", "additionalProperties": {"type": "string", "pattern": LABEL_VALUE}}
    selector = _closed(matchLabels=labels, matchExpressions={"type": "array", "items": _closed(
        ["key", "operator"], key={"type": "string"}, operator={"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
        values={"type": "array", "items": {"type": "string"}})})
    int_or_string = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 65535},
                               {"type": "string", "pattern": PORT_NAME}]}
    quantity = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": QUANTITY}]}
    return {
        ("v1", "Secret"): kind("Secret", type={"type": "string", "minLength": 1}, immutable={"type": "boolean"},
                               data=_data_map(base64_value), stringData=_data_map({"type": "string"})),
        ("v1", "ConfigMap"): kind("ConfigMap", data=_data_map({"type": "string"}), immutable={"type": "boolean"},
                                  binaryData=_data_map(base64_value)),
        ("v1", "Service"): kind("Service", name_pattern=DNS1035_LABEL, spec=_closed(
            ["ports"], type={"enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]},
            selector={"type": "object", "additionalProperties": {"type": "string"}},
            ports={"type": "array", "minItems": 1, "items": _closed(
                ["port"], name={"type": "string", "pattern": f"^{DNS1123_LABEL}$", "maxLength": 63},
                port={"type": "integer", "minimum": 1, "maximum": 65535}, targetPort=int_or_string,
                protocol={"enum": ["TCP", "UDP", "SCTP"]})})),
        ("v1", "PersistentVolumeClaim"): kind("PersistentVolumeClaim", spec=_closed(
            ["accessModes", "resources"], storageClassName={"type": "string"},
            accessModes={"type": "array", "minItems": 1, "items": {
                "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}},
            resources=_closed(["requests"], requests=_closed(["storage"], storage=quantity)))),
        ("apps/v1", "Deployment"): kind("Deployment", api_version="apps/v1", spec=_closed(
            ["selector", "template"], replicas={"type": "integer", "minimum": 0}, selector=selector,
            strategy=_closed(["type"], type={"enum": ["Recreate", "RollingUpdate"]}),
            template=pod_template)),
    }


def load_crds() -> list[dict]:
    if not CRD_DIR.is_dir():
        pytest.fail(f"KubeRay CRDs not found at {CRD_DIR} (k8s/crds/ is part of the repository)")
    return [yaml.load((CRD_DIR / file).read_text(), Loader=Loader) for file in CRD_FILES]


CRDS = load_crds()


def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) → strict schema, for every version of the KubeRay CRDs."""
    schemas = {}
    for crd in CRDS:
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = strict_schema(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = object_meta(DNS1035_LABEL, KUBERAY_MAX_NAME)
            schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
            schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def pod_template_schema() -> dict:
    """PodTemplateSpec's strict schema, as the RayCluster CRD declares a head group's template."""
    [crd] = [c for c in CRDS if c["spec"]["names"]["kind"] == "RayCluster"]
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict_schema(v1["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["headGroupSpec"]
                         ["properties"]["template"])


@pytest.fixture(scope="module")
def validators() -> dict[tuple[str, str], Draft7Validator]:
    out = {}
    for key, schema in {**crd_schemas(), **core_schemas(pod_template_schema())}.items():
        Draft7Validator.check_schema(schema)
        out[key] = Draft7Validator(schema)
    return out


def errors(validators: dict[tuple[str, str], Draft7Validator], doc: dict) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in validators:
        return [f"no schema for apiVersion/kind {key}: add one to tests/repo/test_k8s.py"]
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validators[key].iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


# ---- the manifests and the project ---------------------------------------------------------------


def load_documents() -> list[tuple[str, dict]]:
    docs = []
    for file in MANIFESTS:
        for doc in yaml.safe_load_all((K8S / file).read_text()):
            if doc is not None:
                docs.append((file, doc))
    return docs


DOCS = load_documents()


def manifest(kind: str) -> dict:
    found = [doc for _, doc in DOCS if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in k8s/, found {len(found)}"
    return found[0]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]["rayClusterConfig"]


def pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """Every pod template of a RayJob / RayService: head, worker groups, the job's submitter."""
    cluster = cluster_spec(doc)
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield f"worker group {group['groupName']}", group["template"]["spec"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        yield "submitter", doc["spec"]["submitterPodTemplate"]["spec"]


def containers(doc: dict) -> Iterator[tuple[str, dict]]:
    for where, spec in pod_specs(doc):
        for container in spec.get("initContainers", []) + spec.get("containers", []):
            yield f"{doc['kind']} {where} container {container.get('name')}", container


def ray_containers(doc: dict) -> Iterator[tuple[str, dict]]:
    """The Ray container (KubeRay's index 0) of the head and of each worker group."""
    for where, spec in pod_specs(doc):
        if where != "submitter":
            yield where, spec["containers"][0]


def ray_kinds() -> list[dict]:
    return [doc for _, doc in DOCS if doc["apiVersion"].startswith("ray.io/")]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(package: str) -> str:
    """The exact version pyproject.toml pins for a dependency (`name[extras]==X`)."""
    for requirement in pyproject()["project"]["dependencies"]:
        match = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==([\w.]+)", requirement.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError(f"pyproject.toml pins no {package}==…")


def serve_config() -> dict:
    return yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())


def serve_config_v2() -> dict:
    return yaml.safe_load(manifest("RayService")["spec"]["serveConfigV2"])


def serve_application() -> dict:
    (app,) = serve_config_v2()["applications"]
    return app


def serve_args() -> AppConfig:
    """The application's args, after every section of it is checked as a deploy checks it."""
    from po_cluster.serving.args import check_application

    return check_application(serve_application())


def serve_deployment(name: str) -> dict:
    """A deployment's entry in serveConfigV2 (its Serve options and user_config)."""
    [entry] = [d for d in serve_application()["deployments"] if d["name"] == name]
    return entry


def cpu_cores(quantity: str | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_bytes(quantity: str | int) -> float:
    units = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    text = str(quantity)
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def ray_capacity(group: dict, container: dict) -> tuple[float, float]:
    """(CPUs, GPUs) Ray sees in one pod: rayStartParams first, else the container limits (KubeRay's rule)."""
    params, limits = group.get("rayStartParams", {}), container["resources"]["limits"]
    cpus = cpu_cores(params["num-cpus"]) if "num-cpus" in params else cpu_cores(limits["cpu"])
    gpus = float(params["num-gpus"]) if "num-gpus" in params else float(limits.get("nvidia.com/gpu", 0))
    return cpus, gpus


def worker_groups(doc: dict) -> list[dict]:
    """Per worker group: name, max pods, and the CPUs and GPUs Ray sees in one pod."""
    out = []
    for group in cluster_spec(doc).get("workerGroupSpecs", []):
        cpus, gpus = ray_capacity(group, group["template"]["spec"]["containers"][0])
        out.append({"name": group["groupName"], "max": group["maxReplicas"], "cpus": cpus, "gpus": gpus})
    return out


def dockerfile_copies() -> list[tuple[list[str], str]]:
    """(sources, absolute destination) of each COPY in k8s/Dockerfile, WORKDIR applied."""
    workdir, copies = PurePosixPath("/"), []
    for line in (K8S / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["WORKDIR"]:
            workdir = workdir / words[1]
        elif words[:1] == ["COPY"]:
            *sources, dest = [w for w in words[1:] if not w.startswith("--")]
            copies.append((sources, str(workdir / dest)))
    return copies


def image_paths() -> dict[str, str]:
    """Absolute path in the image → repository path, for each COPY of one source."""
    return {dest: sources[0].rstrip("/") for sources, dest in dockerfile_copies() if len(sources) == 1}


def repo_path_of(image_path: str) -> Path:
    for dest, source in image_paths().items():
        if image_path == dest or image_path.startswith(dest.rstrip("/") + "/"):
            return ROOT / source / PurePosixPath(image_path).relative_to(dest)
    raise AssertionError(f"{image_path} is not in the image: no COPY in k8s/Dockerfile puts it there")


def config_maps() -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: doc.get("data", {}) for _, doc in DOCS if doc["kind"] == "ConfigMap"}


def mounted_config(pod: dict, container: dict, path: str) -> tuple[str, str]:
    """(ConfigMap, key) of the file at `path` in a container: a mount of the file's folder, not a
    subPath (those miss updates), from a ConfigMap volume holding that key."""
    folder, name = str(PurePosixPath(path).parent), PurePosixPath(path).name
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == folder]
    assert len(mounts) == 1 and "subPath" not in mounts[0], f"no mount of a volume at {folder}"
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    source = volumes[mounts[0]["name"]].get("configMap")
    assert source, f"{folder} is not a ConfigMap volume"
    keys = {item["key"]: item["path"] for item in source.get("items", [])}
    key = next((k for k, p in keys.items() if p == name), None) if keys else name
    assert key is not None and key in config_maps().get(source["name"], {}), \
        f"{path}: ConfigMap {source['name']} (k8s/configmaps.yaml) has no key for it"
    return source["name"], key


def entrypoint_config() -> tuple[str, str]:
    """The RayJob entrypoint's --config: (ConfigMap, key) mounted at that path on the head."""
    argv = shlex.split(manifest("RayJob")["spec"]["entrypoint"])
    assert "--config" in argv, f"the entrypoint names no --config: {argv}"
    path = argv[argv.index("--config") + 1]
    # The job's driver runs in a working directory of Ray's choosing, not necessarily the WORKDIR.
    assert path.startswith("/"), f"the entrypoint's config {path} must be an absolute path"
    head = cluster_spec(manifest("RayJob"))["headGroupSpec"]["template"]["spec"]
    return mounted_config(head, head["containers"][0], path)


def sweep_config() -> SweepConfig:
    from po_cluster.config import SweepConfig, load_config

    name, key = entrypoint_config()
    assert config_maps()[name][key] == SWEEP_CONFIG.read_text(), \
        f"ConfigMap {name} in k8s/configmaps.yaml differs from {SWEEP_CONFIG.relative_to(ROOT)}: paste the file again"
    return load_config(SWEEP_CONFIG, SweepConfig)


# ---- the manifests against the schemas ----------------------------------------------------------


@pytest.mark.parametrize("file,doc", DOCS, ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCS])
def test_manifest_validates_against_its_schema(validators, file: str, doc: dict) -> None:
    assert errors(validators, doc) == [], f"k8s/{file}"


def test_manifests_hold_the_expected_kinds() -> None:
    kinds = sorted(doc["kind"] for _, doc in DOCS)
    assert kinds.count("RayJob") == 1 and kinds.count("RayService") == 1 and "Secret" in kinds


def _set(doc: dict, path: tuple, value: Any) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return doc


def _rename(doc: dict, path: tuple, new_name: str) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[new_name] = node.pop(path[-1])
    return doc


HEAD = ("spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0)
BROKEN = {
    "misspelled top field": ("RayService", lambda d: _rename(d, ("spec", "serveConfigV2"), "serveConfigv2")),
    "misspelled cluster field": ("RayService", lambda d: _rename(
        d, ("spec", "rayClusterConfig", "enableInTreeAutoscaling"), "enableInTreeAutoscalling")),
    "misspelled container field": ("RayService", lambda d: _rename(d, (*HEAD, "resources"), "resource")),
    "misspelled job field": ("RayJob", lambda d: _rename(d, ("spec", "shutdownAfterJobFinishes"),
                                                         "shutdownAfterJobFinish")),
    "misspelled metadata field": ("RayJob", lambda d: _rename(d, ("metadata", "name"), "nmae")),
    "auth mode not in the enum": ("RayService", lambda d: _set(d, ("spec", "rayClusterConfig", "authOptions",
                                                                   "mode"), "tokens")),
    "replicas as a string": ("RayJob", lambda d: _set(d, ("spec", "rayClusterSpec", "workerGroupSpecs", 0,
                                                          "maxReplicas"), "4")),
    "quantity neither int nor string": ("RayService", lambda d: _set(d, (*HEAD, "resources", "limits", "cpu"), [2])),
    "name not DNS-1035": ("RayService", lambda d: _set(d, ("metadata", "name"), "Po_Serve")),
    "secret data not base64": ("Secret", lambda d: _set(d, ("data",), {"k": "not base64!"})),
    "secret name not DNS-1123": ("Secret", lambda d: _set(d, ("metadata", "name"), "PO-Secret")),
    "stringData value not a string": ("Secret", lambda d: _set(d, ("stringData",), {"k": 3})),
    "misspelled secret field": ("Secret", lambda d: _set(d, ("stringdata",), {"k": "v"})),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_manifest_is_refused(validators, case: str) -> None:
    kind, breaker = BROKEN[case]
    doc = next(doc for _, doc in DOCS if doc["kind"] == kind)
    assert errors(validators, doc) == []  # the control: unbroken, it passes
    assert errors(validators, breaker(doc)), f"{case}: accepted"


def test_quantities_take_integers_and_strings(validators) -> None:
    doc = manifest("RayService")
    assert errors(validators, _set(doc, (*HEAD, "resources", "limits", "cpu"), 2)) == []
    assert errors(validators, _set(doc, (*HEAD, "resources", "limits", "cpu"), "2500m")) == []


def test_strict_schema_keeps_preserved_objects_open() -> None:
    schema = strict_schema({"type": "object", "properties": {
        "open": {"type": "object", "properties": {"a": {"type": "string"}},
                 "x-kubernetes-preserve-unknown-fields": True},
        "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
        "port": {"x-kubernetes-int-or-string": True}}})
    validator = Draft7Validator(schema)
    assert validator.is_valid({"open": {"a": "x", "b": 1}, "closed": {"a": "x"}, "port": 80})
    assert validator.is_valid({"port": "http"})
    assert not validator.is_valid({"closed": {"b": 1}})
    assert not validator.is_valid({"other": 1})
    assert not validator.is_valid({"port": 1.5})


# ---- what the API server does beyond the schema: defaults, list types, CEL rules ----------------

# The CEL rules (x-kubernetes-validations) the three CRDs hold across their served versions.
CEL_RULES_IN_THE_CRDS = 17


@pytest.fixture(scope="module")
def api() -> dict[str, CustomResourceDefinition]:
    """kind → the CRD as the API server serves it (v1, the stored version), its CEL rules compiled."""
    return {crd["spec"]["names"]["kind"]: CustomResourceDefinition(crd, "v1") for crd in CRDS}


def derived_cluster(doc: dict) -> dict:
    """The RayCluster KubeRay creates for a RayJob or RayService: its spec is the embedded cluster spec,
    and the API server admits it against the RayCluster CRD like any other object."""
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": doc["metadata"]["name"], "labels": doc["metadata"].get("labels", {})},
            "spec": copy.deepcopy(cluster_spec(doc))}


def ray_objects() -> list[tuple[str, dict]]:
    out = []
    for doc in ray_kinds():
        out += [(doc["kind"], doc), (f"RayCluster of the {doc['kind']}", derived_cluster(doc))]
    return out


def _at(doc: dict, where: str) -> tuple[dict, str]:
    """The parent object of a rule's field (made where missing) and the field's name; `[*]` is item 0."""
    *parents, last = where.split(".")
    node: Any = doc
    for part in parents:
        name, many = (part[:-3], True) if part.endswith("[*]") else (part, False)
        node = node.setdefault(name, [{}] if many else {})
        if many:
            node = node[0]
    return node, last


def with_value(doc: dict, where: str, value: Any) -> dict:
    """A copy of doc with the field a rule sits on set to value."""
    doc = copy.deepcopy(doc)
    parent, name = _at(doc, where)
    parent[name] = value
    return doc


# For each kind of rule in the CRDs, by the field it guards: a value it admits and one it refuses,
# or for a transition rule (oldSelf) the stored value and the update that it refuses.
DELETION_RULE = {"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 60}}
CEL_CASES: dict[str, tuple[Any, Any]] = {
    "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']": (
        "ray.io/kuberay-operator", "example.com/another-controller"),
    "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))": (
        {"deletionRules": [DELETION_RULE]},
        {"onSuccess": {"policy": "DeleteCluster"}, "onFailure": {"policy": "DeleteNone"},
         "deletionRules": [DELETION_RULE]}),
    "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))": (
        {"onSuccess": {"policy": "DeleteCluster"}, "onFailure": {"policy": "DeleteNone"}},
        {"onSuccess": {"policy": "DeleteCluster"}}),
    "!(has(self.jobStatus) && has(self.jobDeploymentStatus))": (
        {"jobStatus": "FAILED"}, {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed"}),
    "has(self.jobStatus) || has(self.jobDeploymentStatus)": (
        {"jobDeploymentStatus": "Failed"}, {"ttlSeconds": 30}),
}
TRANSITIONS: dict[str, tuple[Any, Any]] = {  # by field name: (stored, changed)
    "backend": ("redis", "rocksdb"),
    "managedBy": ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"),
}


def all_rules() -> list[tuple[str, Rule]]:
    kinds = {crd["spec"]["names"]["kind"]: crd for crd in CRDS}
    return [(kind, rule) for kind, crd in kinds.items() for rule in CustomResourceDefinition(crd, "v1").all_rules()]


RULES = all_rules()


def base_object(kind: str) -> dict:
    """The shipped object of a kind (a RayCluster: the one KubeRay makes from the RayService)."""
    return derived_cluster(manifest("RayService")) if kind == "RayCluster" else manifest(kind)


def test_every_cel_rule_of_the_crds_is_compiled() -> None:
    served = 0
    for crd in CRDS:
        for version in crd["spec"]["versions"]:
            served += len(CustomResourceDefinition(crd, version["name"]).all_rules())
    assert served == CEL_RULES_IN_THE_CRDS == len(RULES)
    assert {rule.text for _, rule in RULES if not rule.transition} <= set(CEL_CASES)
    assert {rule.where.rsplit(".", 1)[-1] for _, rule in RULES if rule.transition} <= set(TRANSITIONS)


@pytest.mark.parametrize("name,doc", ray_objects(), ids=[name for name, _ in ray_objects()])
def test_manifest_is_admitted_as_the_api_server_would(api, name: str, doc: dict) -> None:
    """Create, then re-apply unchanged (an update: transition rules run): no error either way."""
    created = api[doc["kind"]].create(doc)
    assert created.errors == [], name
    updated = api[doc["kind"]].update(doc, doc)
    assert updated.errors == [], name
    if "gcsFaultToleranceOptions" in cluster_spec(doc) if doc["kind"] != "RayCluster" else \
            "gcsFaultToleranceOptions" in doc["spec"]:
        assert any(rule.text == "self == oldSelf" for rule, _ in updated.evaluated), \
            f"{name}: the backend's immutability rule was not evaluated on the update"


@pytest.mark.parametrize("kind,rule", RULES, ids=[f"{k}:{r.where}:{r.text[:40]}" for k, r in RULES])
def test_each_cel_rule_admits_the_good_and_refuses_the_broken_with_its_message(api, kind: str, rule: Rule) -> None:
    crd, base = api[kind], base_object(kind)
    field_name = rule.where.rsplit(".", 1)[-1]
    if rule.transition:
        stored, changed = TRANSITIONS[field_name]
        old = with_value(base, rule.where, stored)
        admitted = crd.update(old, old)
        refused = crd.update(old, with_value(base, rule.where, changed))
        assert crd.create(with_value(base, rule.where, changed)).errors == [], "a create runs no transition rule"
    else:
        good, bad = CEL_CASES[rule.text]
        admitted = crd.create(with_value(base, rule.where, good))
        refused = crd.create(with_value(base, rule.where, bad))
    assert admitted.errors == [] and rule in [r for r, _ in admitted.evaluated], f"{rule.where}: not evaluated"
    path = rule.where.replace("[*]", "[0]")
    assert any(e.startswith(f"{path}: Invalid value: ") and e.endswith(f": {rule.message}") for e in refused.errors), \
        refused.errors


def test_defaults_are_applied_before_validation(api) -> None:
    """As stored, a RayJob carries the CRD's defaults: a port's protocol, a job's backoffLimit."""
    job = manifest("RayJob")
    stored = api["RayJob"].create({**job, "spec": {k: v for k, v in job["spec"].items() if k != "backoffLimit"}}).obj
    assert stored["spec"]["backoffLimit"] == 0
    head = stored["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {port.get("protocol") for port in head["ports"]} == {"TCP"}
    assert "protocol" not in job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "ports"][0], "the manifest itself is left as written"


RAY_HEAD = ("spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0)
LIST_TYPE_BROKEN = {
    # list-map keyed by (containerPort, protocol): the duplicate shows only once protocol is defaulted
    "port listed twice": ((*RAY_HEAD, "ports"), lambda ports: [*ports, {"containerPort": 8000, "name": "serve2",
                                                                        "protocol": "TCP"}],
                          "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].ports[7]: Duplicate value: "
                          '{"containerPort": 8000, "protocol": "TCP"}'),
    "env variable set twice": ((*RAY_HEAD, "env"), lambda env: [*env, {"name": "RAY_SERVE_ENABLE_HA_PROXY",
                                                                       "value": "0"}],
                               "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].env[4]: Duplicate "
                               'value: {"name": "RAY_SERVE_ENABLE_HA_PROXY"}'),
    "volume mount without its key": ((*RAY_HEAD, "volumeMounts"), lambda mounts: [*mounts, {"name": "dshm"}],
                                     "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].volumeMounts[3]"
                                     ".mountPath: Required value"),
    # list-set: an exit code twice in a container's restart rule
    "exit code twice in a set": ((*RAY_HEAD, "restartPolicyRules"), lambda _: [
        {"action": "Restart", "exitCodes": {"operator": "In", "values": [42, 42]}}],
        "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].restartPolicyRules[0].exitCodes.values[1]: "
        "Duplicate value: 42"),
}


@pytest.mark.parametrize("case", sorted(LIST_TYPE_BROKEN))
def test_list_types_are_enforced(api, case: str) -> None:
    path, change, expected = LIST_TYPE_BROKEN[case]
    doc = copy.deepcopy(manifest("RayService"))
    node: Any = doc
    for part in path[:-1]:
        node = node[part]
    assert api["RayService"].create(doc).errors == []
    node[path[-1]] = change(node.get(path[-1], []))
    assert expected in api["RayService"].create(doc).errors


def test_cel_rules_evaluated_on_the_shipped_manifests(api) -> None:
    """What the shipped objects make the server evaluate (a rule whose field is absent is skipped, as
    there): on an update, the RayService's and its RayCluster's backend immutability."""
    evaluated = [(name, rule.where) for name, doc in ray_objects()
                 for rule, _ in api[doc["kind"]].update(doc, doc).evaluated]
    assert ("RayService", "spec.rayClusterConfig.gcsFaultToleranceOptions.backend") in evaluated
    assert ("RayCluster of the RayService", "spec.gcsFaultToleranceOptions.backend") in evaluated


# ---- KubeRay's own checks (validation.go), beyond the CRD schema ---------------------------------


@pytest.mark.parametrize("doc", ray_kinds(), ids=lambda d: d["kind"])
def test_operator_rules(doc: dict) -> None:
    cluster = cluster_spec(doc)
    assert cluster["rayVersion"] == pinned("ray"), "rayVersion must be the Ray the image installs"
    if cluster.get("authOptions", {}).get("mode") == "token":
        assert tuple(map(int, cluster["rayVersion"].split("."))) >= (2, 52, 0), "token auth needs Ray ≥ 2.52"
    head = cluster["headGroupSpec"]
    head_env = {e["name"] for e in head["template"]["spec"]["containers"][0].get("env", [])}
    if "gcsFaultToleranceOptions" in cluster:
        assert "redis-password" not in head.get("rayStartParams", {})
        assert not head_env & {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS", "REDIS_USERNAME"}
    if cluster.get("autoscalerOptions", {}).get("version") == "v2":
        for where, spec in pod_specs(doc):
            if where != "submitter":
                assert spec.get("restartPolicy", "Never") == "Never", f"{where}: autoscaler v2 wants Never"
    for group in cluster.get("workerGroupSpecs", []):
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        if group.get("resources"):
            assert not {"num-cpus", "num-gpus", "memory", "resources"} & set(group.get("rayStartParams", {}))


def test_rayjob_rules() -> None:
    spec = manifest("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True, "the GPU cluster must go away when the job ends"
    assert spec.get("ttlSecondsAfterFinished", 0) >= 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    if "submitterPodTemplate" in spec:  # a Kubernetes Job's pod
        assert spec["submitterPodTemplate"]["spec"].get("restartPolicy") in ("Never", "OnFailure")
    assert cluster_spec(manifest("RayJob"))["enableInTreeAutoscaling"] is True


def test_rayservice_rules() -> None:
    spec = manifest("RayService")["spec"]
    assert spec.get("upgradeStrategy", {}).get("type", "NewCluster") in (
        "NewCluster", "NewClusterWithIncrementalUpgrade", "None")
    cluster = cluster_spec(manifest("RayService"))
    assert cluster["enableInTreeAutoscaling"] is True
    ft = cluster["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] and "valueFrom" in ft["redisPassword"], "the Redis password comes from a Secret"


def one(kind: str, file: str) -> dict:
    found = [doc for f, doc in DOCS if f == file and doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in k8s/{file}"
    return found[0]


def test_the_redis_of_gcs_fault_tolerance_is_shipped() -> None:
    """redisAddress names k8s/redis.yaml's Service and port; that Service selects the Redis pod, whose
    password is the Secret key the RayService hands the GCS; its data outlives the pod."""
    ft = cluster_spec(manifest("RayService"))["gcsFaultToleranceOptions"]
    host, port = ft["redisAddress"].rsplit(":", 1)
    service, deployment = one("Service", "redis.yaml"), one("Deployment", "redis.yaml")
    assert service["metadata"]["name"] == host and int(port) in [p["port"] for p in service["spec"]["ports"]]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"], labels)
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items()), "the Service selects no Redis pod"
    [container] = pod["spec"]["containers"]
    target = next(p["targetPort"] for p in service["spec"]["ports"] if p["port"] == int(port))
    ports = named_ports(container)
    assert (target in ports) if isinstance(target, str) else (target in ports.values()), "no such container port"
    password = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == password, "Redis and the GCS use one password"
    argv = container.get("command", []) + container.get("args", [])
    assert argv[argv.index("--requirepass") + 1] == "$(REDIS_PASSWORD)", "the password comes from the Secret"
    assert argv[argv.index("--appendonly") + 1] == "yes", "every write reaches the disk"
    data_dir = argv[argv.index("--dir") + 1]
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == data_dir]
    [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    claim = one("PersistentVolumeClaim", "redis.yaml")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate", \
        "one Redis at a time on a ReadWriteOnce volume"
    _check_resources("redis", container["resources"])


def test_rayservice_pods_run_serves_high_throughput_ingress() -> None:
    """Every Ray pod of the RayService (HAProxy runs per node) has the variables po-cluster sets on the
    Rays it starts itself, with the same values."""
    from po_cluster.serving.ingress import SERVE_ENV

    pods = list(ray_containers(manifest("RayService")))
    assert len(pods) == 3  # head, cpu and gpu workers
    for where, container in pods:
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert {name: env.get(name) for name in SERVE_ENV} == SERVE_ENV, where


@pytest.mark.parametrize("doc", ray_kinds(), ids=lambda d: d["kind"])
def test_token_authentication_is_on_and_left_to_the_operator(doc: dict) -> None:
    auth = cluster_spec(doc)["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    # The operator injects these from the Secret and skips a name already set: a hand-written one would win.
    for where, container in containers(doc):
        names = {e["name"] for e in container.get("env", [])}
        assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}, where


# ---- containers, images, secrets ----------------------------------------------------------------


def _check_resources(where: str, resources: dict) -> None:
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    for name, amounts in (("requests", requests), ("limits", limits)):
        assert {"cpu", "memory"} <= set(amounts), f"{where}: resources.{name} needs cpu and memory"
    assert cpu_cores(requests["cpu"]) <= cpu_cores(limits["cpu"]), where
    assert memory_bytes(requests["memory"]) <= memory_bytes(limits["memory"]), where
    for name in set(requests) | set(limits):  # extended resources (GPUs) cannot be overcommitted
        if "/" in name:
            assert str(requests.get(name)) == str(limits.get(name)), f"{where}: {name} requests ≠ limits"


@pytest.mark.parametrize("doc", ray_kinds(), ids=lambda d: d["kind"])
def test_every_container_has_requests_and_limits(doc: dict) -> None:
    found = list(containers(doc))
    assert found
    for where, container in found:
        _check_resources(where, container.get("resources", {}))
    cluster = cluster_spec(doc)
    if cluster.get("enableInTreeAutoscaling"):  # the autoscaler sidecar KubeRay adds to the head
        _check_resources(f"{doc['kind']} autoscaler", cluster.get("autoscalerOptions", {}).get("resources", {}))


def test_one_image_tag_across_manifests() -> None:
    images = {container["image"] for doc in ray_kinds() for _, container in containers(doc)}
    images |= {cluster_spec(doc)["autoscalerOptions"]["image"] for doc in ray_kinds()
               if "image" in cluster_spec(doc).get("autoscalerOptions", {})}
    assert len(images) == 1, f"one image everywhere, found {sorted(images)}"
    (image,) = images
    # A tag, not :latest or none: a new tag is what makes KubeRay roll a RayService to a new cluster.
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag and tag != "latest", image


def _secret_references(node: Any, parent: str = "") -> Iterator[tuple[str, str | None]]:
    """(secret name, key or None for the whole Secret) for every reference in a manifest."""
    if isinstance(node, list):
        for item in node:
            yield from _secret_references(item, parent)
        return
    if not isinstance(node, dict):
        return
    if parent == "secretKeyRef":
        yield node["name"], node["key"]
    elif parent == "secretRef":
        yield node["name"], None
    elif parent == "secret" and "secretName" in node:  # a volume
        for item in node.get("items") or [{"key": None}]:
            yield node["secretName"], item["key"]
    elif parent == "authOptions" and node.get("secretName"):
        yield node["secretName"], "auth_token"  # the key KubeRay reads
    for key, value in node.items():
        yield from _secret_references(value, key)


def example_secrets() -> dict[str, dict[str, str]]:
    out = {}
    for file, doc in DOCS:
        if file == SECRETS_FILE and doc["kind"] == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
            out[doc["metadata"]["name"]] = {**data, **(doc.get("stringData") or {})}
    return out


@pytest.mark.parametrize("doc", ray_kinds(), ids=lambda d: d["kind"])
def test_every_secret_reference_is_in_the_example(doc: dict) -> None:
    secrets = example_secrets()
    references = list(_secret_references(doc))
    assert references
    for name, key in references:
        assert name in secrets, f"{doc['kind']} references Secret {name}, absent from k8s/{SECRETS_FILE}"
        assert key is None or key in secrets[name], f"Secret {name} has no key {key} in k8s/{SECRETS_FILE}"


def test_example_secrets_hold_only_placeholders() -> None:
    not_secret = {("po-cluster-s3", "AWS_REGION")}
    for name, values in example_secrets().items():
        for key, value in values.items():
            if (name, key) not in not_secret:
                assert value.strip() and all("REPLACE-ME" in line for line in value.strip().splitlines()), \
                    f"k8s/{SECRETS_FILE}: {name}.{key} must stay a REPLACE-ME placeholder"


@pytest.mark.parametrize("doc", ray_kinds(), ids=lambda d: d["kind"])
def test_ray_containers_get_s3_credentials(doc: dict) -> None:
    # Trials, the soups and the Serve replicas all read or write S3, from any pod.
    for where, container in ray_containers(doc):
        refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert "po-cluster-s3" in refs, f"{doc['kind']} {where}"


# ---- the RayService runs the project's Serve application -----------------------------------------


def test_serve_config_v2_is_serve_config_yaml() -> None:
    # One source of truth: no per-environment overrides. Edit serve/config.yaml, paste it into
    # k8s/rayservice.yaml under serveConfigV2 and into k8s/configmaps.yaml.
    assert serve_config_v2() == serve_config(), \
        "k8s/rayservice.yaml spec.serveConfigV2 differs from serve/config.yaml: paste the file again"
    head = cluster_spec(manifest("RayService"))["headGroupSpec"]["template"]["spec"]
    name, key = mounted_config(head, head["containers"][0], "/etc/po-cluster/serve/config.yaml")
    assert config_maps()[name][key] == (ROOT / "serve" / "config.yaml").read_text(), \
        f"ConfigMap {name} in k8s/configmaps.yaml differs from serve/config.yaml: paste the file again"


def test_no_config_is_baked_into_the_image() -> None:
    """Configs come from ConfigMaps: the image holds no configs/ or serve/ to drift from them."""
    copied = {source.rstrip("/") for sources, _ in dockerfile_copies() for source in sources}
    assert not copied & {"configs", "serve"}, "k8s/Dockerfile copies a config folder"


def test_serve_config_v2_parses_and_imports_the_real_app() -> None:
    from ray.serve._private.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    from po_cluster.serving.app import build_app

    schema = ServeDeploySchema.model_validate(serve_config_v2())
    assert [app.import_path for app in schema.applications] == ["po_cluster.serving.app:build_app"]
    assert import_attr(schema.applications[0].import_path) is build_app
    args = serve_args()  # what build_app validates first, and each deployment's user_config
    assert args.store.startswith("s3://"), "pods share no disk: the store must be S3"


def test_serve_port_is_declared_on_every_pod() -> None:
    port = serve_config_v2()["http_options"]["port"]
    for where, container in ray_containers(manifest("RayService")):
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        assert ports.get("serve") == port, f"{where}: containerPort {port} named serve"


def test_api_keys_file_is_mounted_on_every_pod() -> None:
    keys_file = PurePosixPath(serve_deployment("Gateway")["user_config"]["auth"]["api_keys_file"])
    for where, spec in pod_specs(manifest("RayService")):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = [m for m in spec["containers"][0].get("volumeMounts", [])
                  if m["mountPath"] == str(keys_file.parent)]
        assert len(mounts) == 1 and "subPath" not in mounts[0], f"{where}: no mount at {keys_file.parent}"
        secret = volumes[mounts[0]["name"]]["secret"]
        paths = {item["path"] for item in secret.get("items", [])} or set(example_secrets()[secret["secretName"]])
        assert keys_file.name in paths, f"{where}: {keys_file} is not a file of the mounted Secret"


def test_serve_replicas_fit_the_worker_groups() -> None:
    groups, model, gateway = worker_groups(manifest("RayService")), serve_deployment("AlignedModel"), \
        serve_deployment("Gateway")
    replicas = model["autoscaling_config"]["max_replicas"] if "autoscaling_config" in model else model["num_replicas"]
    cpus, gpus = model["ray_actor_options"].get("num_cpus", 1), model["ray_actor_options"].get("num_gpus", 0)
    if gpus > 0:
        usable = [g for g in groups if g["gpus"] >= gpus]
        assert sum(g["max"] * g["gpus"] for g in usable) >= replicas * gpus
    else:
        usable = [g for g in groups if g["gpus"] == 0]  # the autoscaler keeps GPU pods for GPU work
        need = replicas * cpus + gateway["num_replicas"] * gateway["ray_actor_options"]["num_cpus"]
        assert sum(g["max"] * g["cpus"] for g in usable) >= need, "max replicas do not fit the CPU group"
    assert any(g["cpus"] >= cpus for g in usable), "one model replica fits no pod"
    if "max_replicas_per_node" in model:  # Serve spreads them: as many pods as replicas, at most per node each
        pods = sum(g["max"] for g in usable)
        assert pods * model["max_replicas_per_node"] >= replicas, "max_replicas_per_node leaves replicas no pod"
        assert model["max_replicas_per_node"] < model.get("autoscaling_config", {}).get(
            "min_replicas", model.get("num_replicas", 1)), "one pod could hold every replica of the minimum"


def test_rayservice_has_cpu_and_gpu_groups() -> None:
    # GPU replicas are one line of serve/config.yaml away (model.num_gpus) and need a group to land on.
    gpus = [g["gpus"] > 0 for g in worker_groups(manifest("RayService"))]
    assert True in gpus and False in gpus


# ---- the RayJob runs the project's pipeline on a valid sweep config ------------------------------


def test_rayjob_entrypoint_is_a_project_command() -> None:
    argv = shlex.split(manifest("RayJob")["spec"]["entrypoint"])
    if argv[0] in pyproject()["project"]["scripts"]:
        from po_cluster.cli import build_parser

        args = build_parser().parse_args(argv[1:])  # exits (SystemExit) on an unknown command or option
        assert args.command in ("pipeline", "sweep", "average", "report"), args.command
    else:
        script = next(a for a in argv if a.endswith(".py"))
        assert argv[0] in ("python", "python3") and repo_path_of(script).is_file(), argv


def test_rayjob_config_loads_as_a_sweep_config() -> None:
    cfg = sweep_config()  # load_config raises ConfigError naming the field if it does not
    assert cfg.scaling.use_gpu, "the RayJob's cluster has GPU workers: the sweep should use them"
    for uri in (cfg.storage_path, cfg.store):
        assert uri.startswith("s3://"), f"{uri}: pods share no disk, and the cluster is deleted after the job"


def test_sweep_publishes_where_the_service_serves() -> None:
    assert sweep_config().store == serve_args().store


def test_sweep_trials_fit_the_gpu_group() -> None:
    cfg, groups = sweep_config(), worker_groups(manifest("RayJob"))
    scaling = cfg.scaling
    gpu_groups = [g for g in groups if g["gpus"] >= scaling.gpus_per_worker]
    assert any(g["cpus"] >= scaling.cpus_per_worker for g in gpu_groups), "one Train worker fits no GPU pod"
    # Tune sizes concurrency from the GPUs present at the start, none with a group scaled to zero.
    assert cfg.max_concurrent_trials is not None, "set max_concurrent_trials for an autoscaled cluster"
    per_pod = [min(g["gpus"] // scaling.gpus_per_worker, g["cpus"] // max(scaling.cpus_per_worker, 1e-9))
               for g in gpu_groups]
    workers = sum(g["max"] * n for g, n in zip(gpu_groups, per_pod, strict=True))
    assert cfg.max_concurrent_trials * scaling.num_workers <= workers, "more trials than GPU pods can hold"


# ---- the image ----------------------------------------------------------------------------------


def test_dockerfile_builds_the_project_with_the_pinned_torch() -> None:
    text = (K8S / "Dockerfile").read_text()
    python = re.search(r">=(\d+\.\d+)", pyproject()["project"]["requires-python"]).group(1)
    assert re.search(rf"^FROM python:{re.escape(python)}-slim\b", text, re.MULTILINE), "base: python:<version>-slim"
    for package in ("torch", "torchvision"):
        assert f"{package}=={pinned(package)}" in text, f"k8s/Dockerfile must pin {package}=={pinned(package)}"
    assert re.search(r"^RUN pip install /tmp/build\b", text, re.MULTILINE), "the project itself is installed"
    assert re.search(r"apt-get install[^\n]*\bwget\b", text), "KubeRay's probes run wget"
    assert re.search(r"^USER (?!0\b|root\b)\S+", text, re.MULTILINE), "run as a non-root user"
    for sources, _ in dockerfile_copies():
        for source in sources:
            assert (ROOT / source).exists(), f"k8s/Dockerfile copies {source}, which is not in the repository"
    assert "/tmp/build/po_cluster" in image_paths()


# ---- monitoring: the PodMonitor and the Grafana dashboard ------------------------------------------

MONITORING = K8S / "monitoring.yaml"
DASHBOARD = K8S / "grafana-dashboard.json"
PROMQL_WORDS = {  # functions, aggregations and keywords: what in an expression is not a metric name
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "quantile", "stddev", "rate", "irate", "increase",
    "histogram_quantile", "scalar", "vector", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "label_values", "clamp_min", "clamp_max", "abs", "max_over_time",
    "absent"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana label_values query) reads.

    Label matchers, ranges, grouping clauses and Grafana variables are dropped first; what is left
    that is an identifier and not a PromQL word is a metric name."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, regexes)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors ([5m], [$__rate_interval])
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"label_values\(([^,()]+),[^)]*\)", r"\1", text)  # label_values(metric, label)
    text = re.sub(r"\$\w+", "", text)
    return {word for word in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text) if word not in PROMQL_WORDS}


def test_metric_names_are_found_in_promql() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, route) (rate(ray_a_bucket{x=~"4xx|5xx", route="/v1"}'
            '[$__rate_interval]))) / scalar(sum(rate(ray_b_total[5m]))) + on(route) max(ray_c)')
    assert metric_names(expr) == {"ray_a_bucket", "ray_b_total", "ray_c"}
    assert metric_names("label_values(ray_d_total, ray_io_cluster)") == {"ray_d_total"}


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [(f"variable {v['name']}", v["definition"]) for v in dashboard["templating"]["list"]
                if v.get("type") == "query"]
    return queries


def test_dashboard_queries_name_only_metrics_the_app_exports() -> None:
    from po_cluster.serving.observe import exported_names

    exported = exported_names()
    for where, expr in dashboard_queries():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= exported, f"{where}: {sorted(names - exported)} are not exported (observe.py)"


def test_dashboard_charts_what_an_operator_asks_first() -> None:
    exprs = [expr for _, expr in dashboard_queries()]
    latency = [e for e in exprs if "ray_po_serve_request_latency_ms_bucket" in e]
    assert any("histogram_quantile(0.5," in e for e in latency) and any("histogram_quantile(0.99," in e
                                                                        for e in latency)
    assert any("rate(ray_po_serve_requests_total" in e and "5xx" in e for e in exprs), "error rate"
    assert any("ray_po_serve_batch_size" in e for e in exprs)
    assert any("ray_serve_deployment_replica_healthy" in e for e in exprs), "replicas"
    assert all("ray_io_cluster" in e for e in exprs), "every query follows the cluster variable"
    dashboard = json.loads(DASHBOARD.read_text())
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def monitoring(kind: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(MONITORING.read_text()) if d is not None and d["kind"] == kind]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Kubernetes' LabelSelector semantics (matchLabels and In / NotIn / Exists / DoesNotExist)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    tests = {"In": lambda e: labels.get(e["key"]) in e["values"],
             "NotIn": lambda e: labels.get(e["key"]) not in e["values"],
             "Exists": lambda e: e["key"] in labels, "DoesNotExist": lambda e: e["key"] not in labels}
    return all(tests[e["operator"]](e) for e in selector.get("matchExpressions", []))


def test_monitoring_objects_are_well_formed() -> None:
    docs = [d for d in yaml.safe_load_all(MONITORING.read_text()) if d is not None]
    assert {d["kind"] for d in docs} == {"PodMonitor", "PrometheusRule"}
    for doc in docs:
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert re.fullmatch(DNS1123_SUBDOMAIN, doc["metadata"]["name"])
    for doc in monitoring("PodMonitor"):
        assert set(doc["spec"]) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
        for endpoint in doc["spec"]["podMetricsEndpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings", "metricRelabelings"}
            assert re.fullmatch(r"\d+[smh]", endpoint.get("interval", "30s"))
        for expression in doc["spec"]["selector"].get("matchExpressions", []):
            assert expression["operator"] in {"In", "NotIn", "Exists", "DoesNotExist"}


def kuberay_pods(doc: dict) -> Iterator[tuple[str, dict, dict]]:
    """(where, labels, Ray container) of each Ray pod KubeRay makes: the template's labels and those
    KubeRay adds (ray.io/node-type, ray.io/group, ray.io/cluster, ray.io/is-ray-node)."""
    cluster = cluster_spec(doc)
    groups = [("head", "headgroup", cluster["headGroupSpec"])] + \
             [("worker", g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    for node_type, name, group in groups:
        labels = {**group["template"].get("metadata", {}).get("labels", {}), "ray.io/node-type": node_type,
                  "ray.io/group": name, "ray.io/cluster": doc["metadata"]["name"], "ray.io/is-ray-node": "yes"}
        yield f"{doc['kind']} {node_type} {name}", labels, group["template"]["spec"]["containers"][0]


def named_ports(container: dict) -> dict[str, int]:
    return {p.get("name"): p["containerPort"] for p in container.get("ports", [])}


@pytest.mark.parametrize("kind", ["RayService", "RayJob"])
def test_every_ray_pod_is_scraped_on_its_metrics_port(kind: str) -> None:
    doc = manifest(kind)
    [monitor] = [m for m in monitoring("PodMonitor") if m["metadata"]["name"] == "po-cluster-ray"]
    ports = {endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]}
    cluster = cluster_spec(doc)
    for (where, labels, container), group in zip(kuberay_pods(doc), [cluster["headGroupSpec"],
                                                                     *cluster["workerGroupSpecs"]], strict=True):
        assert selects(monitor["spec"]["selector"], labels), f"{where}: not selected by the PodMonitor"
        named = named_ports(container)
        port = int(group.get("rayStartParams", {}).get("metrics-export-port", 8080))  # KubeRay's default
        assert ports <= set(named) and all(named[p] == port for p in ports), \
            f"{where}: the scraped port is not Ray's metrics-export-port {port}"
    if kind == "RayJob":  # the submitter runs no Ray node: nothing to scrape there
        labels = doc["spec"]["submitterPodTemplate"].get("metadata", {}).get("labels", {})
        assert not any(selects(m["spec"]["selector"], labels) for m in monitoring("PodMonitor"))


@pytest.mark.parametrize("kind", ["RayService", "RayJob"])
def test_the_heads_autoscaler_and_dashboard_are_scraped(kind: str) -> None:
    """As KubeRay's own monitor config: the head's autoscaler and dashboard exporters, on the ports
    Ray 2.60 opens for them, and on no worker (which runs neither)."""
    from ray.autoscaler._private.constants import AUTOSCALER_METRIC_PORT
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    [monitor] = [m for m in monitoring("PodMonitor") if m["metadata"]["name"] == "po-cluster-ray-head"]
    ports = {endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]}
    assert ports == {"as-metrics", "dash-metrics"}
    for where, labels, container in kuberay_pods(manifest(kind)):
        if labels["ray.io/node-type"] == "head":
            assert selects(monitor["spec"]["selector"], labels), where
            assert named_ports(container).get("as-metrics") == AUTOSCALER_METRIC_PORT, where
            assert named_ports(container).get("dash-metrics") == DASHBOARD_METRIC_PORT, where
        else:
            assert not selects(monitor["spec"]["selector"], labels), f"{where}: a worker has no such exporter"


def test_redis_is_not_scraped_as_a_ray_pod() -> None:
    [deployment] = [d for _, d in DOCS if d["kind"] == "Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert not any(selects(m["spec"]["selector"], labels) for m in monitoring("PodMonitor"))


def ray_train_metrics() -> tuple[str, str, str]:
    """(series name, state label, errored value) of Ray Train's controller-state gauge, read from the
    installed Ray: each trial of the sweep is a TorchTrainer run, whose controller sets it."""
    from ray.train.v2._internal.execution.controller.state import TrainControllerStateType
    from ray.train.v2._internal.metrics.controller import ControllerMetrics

    return (f"ray_{ControllerMetrics.CONTROLLER_STATE}", ControllerMetrics.CONTROLLER_STATE_TAG_KEY,
            TrainControllerStateType.ERRORED.name)


def alert_rules() -> dict[str, dict]:
    [rule] = monitoring("PrometheusRule")
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


def test_alert_rules_are_well_formed() -> None:
    for name, rule in alert_rules().items():
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", name), name
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, name
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), name
        assert rule["labels"]["severity"] in ("page", "warn"), name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), name
        assert re.search(r"[<>]=?\s*[0-9.]+\s*$", expr), f"{name}: an alert compares with a threshold"


def test_alerts_read_only_metrics_that_are_exported() -> None:
    """Every series an alert reads is one po-cluster exports (observe.exported_names, which the
    integration test checks on Ray's endpoint) or Ray Train's controller state (read from Ray)."""
    from po_cluster.serving.observe import exported_names

    train_state, state_label, errored = ray_train_metrics()
    known = exported_names() | {train_state}
    for name, rule in alert_rules().items():
        names = metric_names(rule["expr"])
        assert names, f"{name}: no metric in {rule['expr']!r}"
        assert names <= known, f"{name}: {sorted(names - known)} are not exported"
    sweep = alert_rules()["PoSweepTrialsFailing"]["expr"]
    assert f'{state_label}="{errored}"' in sweep


def test_alerts_cover_what_a_serving_team_pages_on() -> None:
    exprs = {name: rule["expr"] for name, rule in alert_rules().items()}
    assert any('status_class="5xx"' in e and "ray_po_serve_requests_total" in e for e in exprs.values()), "5xx"
    assert any("histogram_quantile(0.99," in e and "ray_po_serve_request_latency_ms_bucket" in e
               for e in exprs.values()), "p99 latency"
    assert any("ray_serve_deployment_replica_starts_total" in e for e in exprs.values()), "replica restarts"
    assert any(ray_train_metrics()[0] in e for e in exprs.values()), "a sweep with failing trials"
