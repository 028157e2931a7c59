"""The Kubernetes manifests and the image (deploy/) agree with the code they run.

Each kustomization (the base and both overlays) is checked twice:
- assembled by this file (resources, generated ConfigMaps, strategic-merge and JSON patches,
  `replicas:` and `namespace:`, as far as these kustomizations use them), so the checks run
  on any machine;
- rendered by kustomize (`kustomize build`, or `kubectl kustomize`, with kustomize v4 or
  later), patches included; skipped with the reason when neither is installed. Debian's
  kubernetes-client (bookworm) bundles kustomize v2, which predates the `patches:` field.

For every Trawl container, the configuration file it is given (the ConfigMap mounted where
`--config` points) is validated by the service's own settings class with the container's
environment (downward-API values replaced by samples), so a key the code does not know, a
bad value or a path the pod does not have fails here rather than in a crash loop.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from trawl.alerter.config import AlerterSettings
from trawl.alerter.rules import load_rules
from trawl.bus import packets_subject
from trawl.cli import _parser
from trawl.collector.config import CollectorSettings
from trawl.config import SERVICES, ServiceSettings
from trawl.dissector.config import DissectorSettings
from trawl.enricher.config import EnricherSettings
from trawl.enricher.k8s_watch import WATCHED
from trawl.errors import ConfigError
from trawl.recorder.config import RecorderSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TARGETS = ("base", "overlays/dev", "overlays/production")
MODES = ("assembled", "kustomize")
SETTINGS: dict[str, type[ServiceSettings]] = {
    "collector": CollectorSettings,
    "dissector": DissectorSettings,
    "enricher": EnricherSettings,
    "recorder": RecorderSettings,
    "alerter": AlerterSettings,
}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
CLUSTER_SCOPED = ("Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass")
SAMPLE_NODE = "node-a"
# The first NATS release with per-message TTLs, which nats-py asks for when it creates a KV bucket
# (the dissectors' shard leases, services/dissector/shards.py).
NATS_WITH_KV_TTL = (2, 11)
# What live capture needs from the node (DESIGN.md: bcc compiles against the node's headers).
COLLECTOR_CAPABILITIES = {"NET_RAW", "NET_ADMIN", "SYS_ADMIN", "BPF", "PERFMON"}
COLLECTOR_HOST_MOUNTS = ("/lib/modules", "/usr/src", "/sys/kernel/debug")
# (API group, resource) the enricher reads: pods and the owner chain up to the workload.
ENRICHER_READS = [
    ("", "pods"),
    ("", "services"),
    ("", "nodes"),
    ("discovery.k8s.io", "endpointslices"),
    *[("apps", r) for r in ("replicasets", "deployments", "statefulsets", "daemonsets")],
    *[("batch", r) for r in ("jobs", "cronjobs")],
]
READ_VERBS = {"get", "list", "watch"}
# The kubernetes client's CoordinationV1Api methods and the RBAC verb each is authorized as.
LEASE_CALL_VERBS = {
    "read": "get",
    "create": "create",
    "replace": "update",
    "patch": "patch",
    "delete": "delete",
    "delete_collection": "deletecollection",
    "list": "list",
}
LEASE_SOURCE = ROOT / "services" / "enricher" / "shared.py"

Doc = dict[str, Any]


# ---- building the manifests ----


def load_docs(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization(directory: Path) -> Doc:
    data = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert isinstance(data, dict), f"{directory}/kustomization.yaml is not a mapping"
    return data


def assemble(directory: Path) -> list[Doc]:
    """`kustomize build`, for the features these kustomizations use, without the ConfigMap name hashes."""
    spec = kustomization(directory)
    docs: list[Doc] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        docs.extend(assemble(path) if path.is_dir() else load_docs(path))
    for generator in spec.get("configMapGenerator", []):
        data = {Path(name).name: (directory / name).read_text() for name in generator.get("files", [])}
        existing = [doc for doc in docs if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == generator["name"]]
        behavior = generator.get("behavior", "create")
        if behavior == "create":
            assert not existing, f"{directory}: ConfigMap {generator['name']} generated twice"
            docs.append(
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data}
            )
        else:
            assert existing, f"{directory}: {behavior} of ConfigMap {generator['name']}, which the resources lack"
            if behavior == "replace":
                existing[0]["data"] = data
            else:
                existing[0]["data"].update(data)
    for patch in spec.get("patches", []):
        if "path" in patch:
            for change in load_docs(directory / patch["path"]):
                target = _one(docs, change["kind"], change["metadata"]["name"], directory)
                _merge(target, change)
        else:
            target = _one(docs, patch["target"]["kind"], patch["target"]["name"], directory)
            for operation in yaml.safe_load(patch["patch"]):
                _json_patch(target, operation)
    for replicas in spec.get("replicas", []):
        targets = [doc for doc in docs if doc["kind"] in WORKLOAD_KINDS and doc["metadata"]["name"] == replicas["name"]]
        assert len(targets) == 1, f"{directory}: replicas names {replicas['name']}, found {len(targets)} workloads"
        targets[0]["spec"]["replicas"] = replicas["count"]
    if namespace := spec.get("namespace"):
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = namespace
    return docs


def _one(docs: list[Doc], kind: str, name: str, directory: Path) -> Doc:
    found = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{directory}: a patch of {kind} {name}, found {len(found)}"
    return found[0]


def _merge(target: Any, change: Any) -> Any:
    """Strategic merge as kustomize does it for these manifests: maps merge key by key, lists of
    named items (containers, env, volumes, ports) merge by name, other values are replaced."""
    if isinstance(target, dict) and isinstance(change, dict):
        for key, value in change.items():
            target[key] = _merge(target[key], value) if key in target else value
        return target
    named = isinstance(target, list) and isinstance(change, list)
    if named and all(isinstance(item, dict) and "name" in item for item in [*target, *change]):
        by_name = {item["name"]: item for item in target}
        for item in change:
            if item["name"] in by_name:
                _merge(by_name[item["name"]], item)
            else:
                target.append(item)
        return target
    return change


def _json_patch(target: Doc, operation: Doc) -> None:
    """RFC 6902 add/replace/remove, the operations the overlays use."""
    *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in operation["path"].split("/")[1:]]
    node: Any = target
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) and last != "-" else last
    if operation["op"] == "remove":
        del node[key]
    elif operation["op"] == "replace":
        assert key in node if isinstance(node, dict) else key < len(node), f"replace of missing {operation['path']}"
        node[key] = operation["value"]
    elif operation["op"] == "add":
        if isinstance(node, list):
            node.insert(len(node) if key == "-" else key, operation["value"])
        else:
            node[key] = operation["value"]
    else:
        raise AssertionError(f"JSON patch op {operation['op']} is not understood by this test")


def _kustomize_major(text: str) -> int | None:
    match = re.search(r"v(\d+)\.\d+", text)
    return int(match.group(1)) if match else None


@functools.cache
def kustomize_command() -> tuple[tuple[str, ...], str]:
    """The build command and "", or () and why there is none."""
    if shutil.which("kustomize"):
        out = subprocess.run(["kustomize", "version"], capture_output=True, text=True, timeout=60).stdout
        major = _kustomize_major(out)
        if major is not None and major >= 4:
            return ("kustomize", "build"), ""
    if shutil.which("kubectl"):
        out = subprocess.run(
            ["kubectl", "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60
        ).stdout
        try:
            version = json.loads(out).get("kustomizeVersion", "")
        except json.JSONDecodeError:
            version = ""
        major = _kustomize_major(version)
        if major is not None and major >= 4:
            return ("kubectl", "kustomize"), ""
        return (), f"kubectl's kustomize is {version or 'unknown'}; the overlays need v4 or later"
    return (), "neither kustomize (v4+) nor kubectl is installed"


@functools.cache
def _rendered(target: str) -> str:
    command, reason = kustomize_command()
    assert command, reason
    result = subprocess.run([*command, str(DEPLOY / target)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)} {target} failed:\n{result.stderr}"
    return result.stdout


@dataclass
class Manifests:
    target: str
    mode: str
    docs: list[Doc]

    def named(self, kind: str, name: str, namespace: str | None = None) -> Doc:
        found = [
            doc
            for doc in self.docs
            if doc["kind"] == kind
            and doc["metadata"]["name"] == name
            and (namespace is None or doc["metadata"].get("namespace") == namespace)
        ]
        assert len(found) == 1, f"{self}: expected one {kind} {name} (namespace {namespace}), found {len(found)}"
        return found[0]

    def pods(self) -> Iterator[Pod]:
        for doc in self.docs:
            if doc["kind"] not in WORKLOAD_KINDS:
                continue
            for container in doc["spec"]["template"]["spec"]["containers"]:
                if _image_name(container["image"]) == "trawl":
                    yield Pod(self, doc, container)

    def pod(self, service: str) -> Pod:
        found = [pod for pod in self.pods() if pod.service == service]
        assert len(found) == 1, f"{self}: expected one {service} container, found {len(found)}"
        return found[0]

    def __str__(self) -> str:
        return f"{self.target} ({self.mode})"


def _image_name(image: str) -> str:
    return image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]


def build(target: str, mode: str) -> Manifests:
    """The manifests of a kustomization, assembled here or rendered by kustomize (skipped without it)."""
    if mode == "assembled":
        return Manifests(target, mode, assemble(DEPLOY / target))
    _, reason = kustomize_command()
    if reason:
        pytest.skip(reason)
    docs = [doc for doc in yaml.safe_load_all(_rendered(target)) if doc is not None]
    return Manifests(target, mode, docs)


@pytest.fixture(params=[(t, m) for t in TARGETS for m in MODES], ids=lambda p: f"{p[0]}-{p[1]}")
def manifests(request: pytest.FixtureRequest) -> Manifests:
    target, mode = request.param
    return build(target, mode)


# ---- one Trawl container as it runs ----


class Pod:
    """A Trawl container in its workload: its files, its environment, its settings."""

    def __init__(self, manifests: Manifests, workload: Doc, container: Doc) -> None:
        self.manifests = manifests
        self.workload = workload
        self.container = container
        self.spec: Doc = workload["spec"]["template"]["spec"]
        self.name: str = workload["metadata"]["name"]
        try:
            self.args = _parser().parse_args(container.get("args", []))
        except SystemExit:
            command = " ".join(container.get("args", []))
            raise AssertionError(f"{self}: `trawl {command}` is not a trawl command") from None
        self.service: str = self.args.command

    def __str__(self) -> str:
        return f"{self.manifests}: {self.workload['kind']} {self.name}"

    @property
    def replicas(self) -> int:
        return int(self.workload["spec"].get("replicas", 1))

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.workload["spec"]["template"]["metadata"].get("annotations", {}))

    def mounts(self) -> list[Doc]:
        return list(self.container.get("volumeMounts", []))

    def volume(self, name: str) -> Doc:
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        claims = {c["metadata"]["name"]: {"name": c["metadata"]["name"], "claimTemplate": c} for c in self.claims()}
        assert name in volumes or name in claims, f"{self}: mount of volume {name}, which the pod does not define"
        return volumes.get(name) or claims[name]

    def claims(self) -> list[Doc]:
        return list(self.workload["spec"].get("volumeClaimTemplates", []))

    def mount_of(self, path: PurePosixPath) -> Doc | None:
        """The mount holding `path` (the deepest one)."""
        holding = [m for m in self.mounts() if path.is_relative_to(m["mountPath"])]
        return max(holding, key=lambda m: len(m["mountPath"]), default=None)

    def files(self) -> dict[PurePosixPath, str]:
        """Every file the pod's ConfigMap volumes put in the container."""
        files: dict[PurePosixPath, str] = {}
        for mount in self.mounts():
            volume = self.volume(mount["name"])
            sources = [volume["configMap"]] if "configMap" in volume else []
            sources += [s["configMap"] for s in volume.get("projected", {}).get("sources", []) if "configMap" in s]
            for source in sources:
                data = self.manifests.named("ConfigMap", source["name"]).get("data", {})
                items = source.get("items") or [{"key": key, "path": key} for key in data]
                for item in items:
                    assert item["key"] in data, f"{self}: ConfigMap {source['name']} has no key {item['key']}"
                    files[PurePosixPath(mount["mountPath"]) / item["path"]] = data[item["key"]]
        return files

    def env(self) -> dict[str, str]:
        """The container's environment, as the kubelet would set it."""
        env: dict[str, str] = {}
        for var in self.container.get("env", []):
            if "value" in var:
                env[var["name"]] = _expand(str(var["value"]), env)
                continue
            field = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            assert field is not None, f"{self}: env {var['name']}: only values and fieldRefs are understood here"
            env[var["name"]] = self._field(field)
        return env

    def _field(self, path: str) -> str:
        samples = {
            "spec.nodeName": SAMPLE_NODE,
            "metadata.name": f"{self.name}-0",
            "metadata.namespace": str(self.workload["metadata"].get("namespace", "default")),
            "status.podIP": "10.0.0.10",
        }
        assert path in samples, f"{self}: env from fieldRef {path!r}, which this test has no sample for"
        return samples[path]

    def config_text(self) -> str:
        config = self.args.config
        assert config is not None, f"{self}: no --config in {self.container.get('args')}"
        files = self.files()
        assert PurePosixPath(config) in files, f"{self}: --config {config} is not in a mounted ConfigMap"
        return files[PurePosixPath(config)]

    def config_section(self) -> dict[str, Any]:
        data = yaml.safe_load(self.config_text()) or {}
        section = {k: v for k, v in data.items() if k not in SERVICES}
        section.update(data.get(self.service) or {})
        return section

    def settings(self, tmp_path: Path) -> Any:
        """The service's settings from its mounted file and environment; fails naming the key at fault."""
        where = tmp_path / self.manifests.target.replace("/", "-") / self.name
        where.mkdir(parents=True, exist_ok=True)
        config_file = where / "trawl.yaml"
        config_file.write_text(self.config_text())
        env = self.env()
        overrides: dict[str, Any] = {}
        if self.service == "alerter":
            rules_path = env.get("TRAWL_ALERTER_RULES_FILE") or self.config_section().get("rules_file")
            assert rules_path, f"{self}: the alerter has no rules_file"
            files = self.files()
            assert PurePosixPath(rules_path) in files, f"{self}: rules_file {rules_path} is not in a mounted ConfigMap"
            overrides["rules_file"] = where / "rules.yaml"
            overrides["rules_file"].write_text(files[PurePosixPath(rules_path)])
        with self.environment():
            try:
                return SETTINGS[self.service].load(config_file, **overrides)
            except ConfigError as exc:
                # The temporary file holds the ConfigMap's text: its line numbers are the source file's.
                pytest.fail(f"{self}: the {self.service} rejects the --config {self.args.config} it is given: {exc}")

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        """This process's environment as the container's: its variables, none of ours (TRAWL_*, OTEL_*)."""
        with pytest.MonkeyPatch.context() as patch:
            for name in list(os.environ):
                if name.startswith(("TRAWL_", "OTEL_")):
                    patch.delenv(name)
            for name, value in self.env().items():
                patch.setenv(name, value)
            yield

    def probe_port(self, probe: Doc) -> int:
        port = probe["httpGet"]["port"]
        if isinstance(port, int):
            return port
        named = {p["name"]: p["containerPort"] for p in self.container.get("ports", []) if "name" in p}
        assert port in named, f"{self}: probe port {port!r} names no container port"
        return int(named[port])

    def security(self, key: str) -> Any:
        """A securityContext key, the container's value winning over the pod's."""
        container = self.container.get("securityContext", {})
        return container[key] if key in container else self.spec.get("securityContext", {}).get(key)


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) references to variables defined earlier; $$ escapes."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, value)


def _quantity(text: str | int) -> int:
    """A Kubernetes or NATS byte quantity: 10Gi, 500M, 9GB, 1024."""
    match = re.fullmatch(r"(\d+)\s*([KMGT]i?B?|[kmgt]b?)?", str(text).strip())
    assert match, f"not a byte quantity: {text!r}"
    unit = (match.group(2) or "").upper().rstrip("B")
    power = " KMGT".index(unit[0]) if unit else 0
    base = 1024 if unit.endswith("I") or str(text).upper().endswith("B") else 1000
    return int(match.group(1)) * int(base**power)


def _subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, `>` the rest."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


# ---- files and references ----


@pytest.mark.parametrize("target", TARGETS)
def test_assembled_manifests_equal_kustomize_output(target: str) -> None:
    """The assembly above is what kustomize builds (bar name hashes and labels): the checks that
    run without kustomize check what a cluster gets."""
    rendered = build(target, "kustomize").docs
    hashed = {
        doc["metadata"]["name"]: doc["metadata"]["name"].rsplit("-", 1)[0]
        for doc in rendered
        if doc["kind"] == "ConfigMap"
    }

    def key(doc: Doc) -> tuple[str, str, str]:
        name = hashed.get(doc["metadata"]["name"], doc["metadata"]["name"])
        return doc["kind"], name, doc["metadata"].get("namespace", "")

    def body(doc: Doc) -> str:
        text = json.dumps({k: v for k, v in doc.items() if k != "metadata"}, sort_keys=True)
        for full, short in hashed.items():
            text = text.replace(f'"{full}"', f'"{short}"')
        return text

    ours = {key(doc): body(doc) for doc in assemble(DEPLOY / target)}
    theirs = {key(doc): body(doc) for doc in rendered}
    assert sorted(ours) == sorted(theirs)
    for name, text in theirs.items():
        assert ours[name] == text, f"{target}: {name} differs from kustomize's"


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            if "kind" in doc and doc["kind"] != "Kustomization":
                assert doc.get("apiVersion"), f"{path}: {doc['kind']} without apiVersion"
                assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} without metadata.name"


@pytest.mark.parametrize("target", TARGETS)
def test_kustomization_references_exist_and_cover_the_folder(target: str) -> None:
    directory = DEPLOY / target
    spec = kustomization(directory)
    referenced: set[Path] = {directory / "kustomization.yaml"}
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        assert path.is_file() or (path / "kustomization.yaml").is_file(), f"{target}: resource {entry} not found"
        referenced.add(path)
    for patch in spec.get("patches", []):
        assert "path" in patch or "patch" in patch, f"{target}: a patch with neither path nor patch"
        if "path" in patch:
            assert (directory / patch["path"]).is_file(), f"{target}: patch {patch['path']} not found"
            referenced.add((directory / patch["path"]).resolve())
        else:
            assert "target" in patch, f"{target}: an inline patch needs a target"
    for generator in spec.get("configMapGenerator", []):
        assert generator.get("files"), f"{target}: ConfigMap {generator['name']} generated from no file"
        for name in generator["files"]:
            assert (directory / name).is_file(), f"{target}: {generator['name']} file {name} not found"
            referenced.add((directory / name).resolve())
    unused = sorted(p.name for p in directory.iterdir() if p.is_file() and p.resolve() not in referenced)
    assert not unused, f"{target}: files no kustomization uses: {unused}"


# ---- the workloads as they run ----


def test_each_service_runs_once_with_a_real_subcommand(manifests: Manifests) -> None:
    services = sorted(pod.service for pod in manifests.pods())
    assert services == sorted(SERVICES), f"{manifests}: Trawl containers run {services}"
    for pod in manifests.pods():
        assert pod.container["args"][0] == pod.service
        assert pod.name == pod.service, f"{pod}: runs `trawl {pod.service}`"
        assert "command" not in pod.container, f"{pod}: the image's entrypoint (trawl) must run"


def test_every_service_accepts_its_configuration(manifests: Manifests, tmp_path: Path) -> None:
    for pod in manifests.pods():
        settings = pod.settings(tmp_path)
        assert settings.http_port is not None, f"{pod}: http_port is not set (no /healthz, /readyz, /metrics)"
        assert settings.log_format == "json", f"{pod}: logs are not JSON"


def test_probes_and_scrape_port_are_the_configured_http_port(manifests: Manifests, tmp_path: Path) -> None:
    for pod in manifests.pods():
        port = pod.settings(tmp_path).http_port
        container = pod.container
        for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            assert probe in container, f"{pod}: no {probe}"
            assert container[probe]["httpGet"]["path"] == path, f"{pod}: {probe} is not on {path}"
            assert pod.probe_port(container[probe]) == port, f"{pod}: {probe} port is not http_port {port}"
        assert port in [p["containerPort"] for p in container.get("ports", [])], f"{pod}: port {port} not declared"
        assert pod.annotations.get("prometheus.io/scrape") == "true", f"{pod}: not scraped"
        assert pod.annotations.get("prometheus.io/port") == str(port), f"{pod}: scraped on another port than {port}"
        assert pod.annotations.get("prometheus.io/path") == "/metrics"


def test_resources_security_and_shutdown(manifests: Manifests) -> None:
    for pod in manifests.pods():
        resources = pod.container.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert resource in resources.get(kind, {}), f"{pod}: no {kind}.{resource}"
        assert _quantity(resources["requests"]["memory"]) <= _quantity(resources["limits"]["memory"])
        assert pod.security("readOnlyRootFilesystem") is True, f"{pod}: the root filesystem is writable"
        tmp = pod.mount_of(PurePosixPath("/tmp/x"))
        assert tmp is not None and "emptyDir" in pod.volume(tmp["name"]), f"{pod}: no writable /tmp"
        assert pod.spec.get("terminationGracePeriodSeconds"), f"{pod}: no terminationGracePeriodSeconds"
        adds = set(pod.security("capabilities").get("add", [])) if pod.security("capabilities") else set()
        if pod.security("allowPrivilegeEscalation") is False:
            # The API server refuses this combination.
            assert not pod.security("privileged"), f"{pod}: privileged with allowPrivilegeEscalation: false"
            assert not adds & {"SYS_ADMIN", "CAP_SYS_ADMIN"}, f"{pod}: SYS_ADMIN with allowPrivilegeEscalation: false"
        if pod.service == "collector":
            continue
        assert pod.security("runAsNonRoot") is True, f"{pod}: may run as root"
        assert pod.security("runAsUser") not in (None, 0), f"{pod}: no non-root runAsUser"
        assert pod.security("allowPrivilegeEscalation") is False, f"{pod}: may escalate privileges"
        assert pod.security("capabilities") == {"drop": ["ALL"]}, f"{pod}: keeps or adds capabilities"
        assert not pod.spec.get("hostNetwork"), f"{pod}: on the host network"


def test_collector_captures_on_every_node_with_what_it_needs(manifests: Manifests, tmp_path: Path) -> None:
    pod = manifests.pod("collector")
    assert pod.workload["kind"] == "DaemonSet"
    assert pod.spec.get("hostNetwork") is True, "the collector must see the node's interfaces"
    assert pod.spec.get("dnsPolicy") == "ClusterFirstWithHostNet", "on the host network it must still resolve nats"
    assert {"operator": "Exists"} in pod.spec.get("tolerations", []), "the collector must run on tainted nodes"
    capabilities = set(pod.security("capabilities").get("add", []))
    assert pod.security("privileged") or capabilities >= COLLECTOR_CAPABILITIES, f"missing {COLLECTOR_CAPABILITIES}"
    mounts = {m["mountPath"]: m for m in pod.mounts()}
    for path in COLLECTOR_HOST_MOUNTS:
        assert path in mounts, f"{pod}: {path} not mounted"
        assert mounts[path].get("readOnly") is True, f"{pod}: {path} is writable"
        assert pod.volume(mounts[path]["name"])["hostPath"]["path"] == path
    assert any(pod.volume(m["name"]).get("hostPath", {}).get("path") == "/proc" for m in pod.mounts()), (
        f"{pod}: the node's /proc (pod network namespaces) is not mounted"
    )
    assert pod.env()["TRAWL_COLLECTOR_NODE"] == SAMPLE_NODE, "the node name must come from spec.nodeName"
    settings = pod.settings(tmp_path)
    assert settings.node == SAMPLE_NODE
    assert settings.pcap is None, f"{pod}: replays a file instead of capturing live"
    section = pod.config_section()
    assert section.get("interfaces") or section.get("pod_loopback"), f"{pod}: no interface to capture"
    assert "4222" in section.get("filter", ""), f"{pod}: the collector would capture its own batches to NATS"


def test_collector_can_load_tls_uprobes(manifests: Manifests, tmp_path: Path) -> None:
    """What the eBPF TLS capture needs (trawl.collector.tls_uprobes): the node's PID namespace
    (every pod's processes in /proc, and its own PID as the program sees it), the capabilities
    to load programs, attach uprobes and read other containers' /proc/<pid>/maps, root and exe,
    tracefs, and the node's kernel headers for bcc; the image carries Debian's bcc."""
    pod = manifests.pod("collector")
    assert pod.spec.get("hostPID") is True, f"{pod}: the TLS uprobes need the node's PID namespace"
    capabilities = set(pod.security("capabilities").get("add", []))
    assert pod.security("privileged") or capabilities >= {"BPF", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"}, capabilities
    mounts = {m["mountPath"]: m for m in pod.mounts()}
    tracefs = mounts.get("/sys/kernel/tracing")
    assert tracefs is not None, f"{pod}: tracefs is not mounted"
    assert pod.volume(tracefs["name"])["hostPath"]["path"] == "/sys/kernel/tracing"
    for path in ("/lib/modules", "/usr/src"):
        assert pod.volume(mounts[path]["name"])["hostPath"]["path"] == path, f"{pod}: {path} is not the node's"
    settings = pod.settings(tmp_path)
    assert settings.tls.mode in ("auto", "on"), f"{pod}: TLS uprobes are off"
    runtime = "\n".join(_dockerfile_stages()[-1])
    assert "python3-bpfcc" in runtime, "the image lacks Debian's bcc"


def test_dissectors_lease_every_collector_shard(manifests: Manifests, tmp_path: Path) -> None:
    """Any number of dissector replicas share the shards through leases: each must know how many
    shards the collector publishes, and the subject of shard k must be the collector's."""
    collector, dissector = manifests.pod("collector"), manifests.pod("dissector")
    shards = collector.settings(tmp_path).shards
    settings = dissector.settings(tmp_path)
    assert dissector.workload["kind"] == "Deployment", f"{dissector}: replicas need no identity of their own"
    assert dissector.replicas >= 1, f"{dissector}: no replica"
    assert settings.shard_assignment == "lease", f"{dissector}: replicas do not share the shards through leases"
    assert settings.shards == shards, f"{manifests}: dissector.shards {settings.shards}, collector.shards {shards}"
    for shard in range(shards):
        subject = settings.shard_subject.format(shard=shard)
        assert _subject_matches(subject, packets_subject(SAMPLE_NODE, shard)), (
            f"{manifests}: the owner of shard {shard} subscribes to {subject}, not to the collector's subject"
        )
        others = [k for k in range(shards) if k != shard and _subject_matches(subject, packets_subject(SAMPLE_NODE, k))]
        assert not others, f"{manifests}: the owner of shard {shard} ({subject}) also takes shards {others}"


def test_nats_keeps_the_dissector_leases(manifests: Manifests) -> None:
    nats = manifests.named("StatefulSet", "nats")
    (image,) = [c["image"] for c in nats["spec"]["template"]["spec"]["containers"] if _image_name(c["image"]) == "nats"]
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)?(?:-\w+)?", image.split("@")[0].rsplit(":", 1)[-1])
    assert match, f"{manifests}: NATS image {image} names no version"
    version = (int(match.group(1)), int(match.group(2)))
    assert version >= NATS_WITH_KV_TTL, f"{manifests}: {image} predates per-message TTLs (the lease bucket)"


def test_recorder_writes_to_its_volume_within_its_size(manifests: Manifests, tmp_path: Path) -> None:
    pod = manifests.pod("recorder")
    settings = pod.settings(tmp_path)
    mount = pod.mount_of(PurePosixPath(settings.directory))
    assert mount is not None, f"{pod}: directory {settings.directory} is not on a volume"
    assert not mount.get("readOnly"), f"{pod}: {settings.directory} is read-only"
    claim = pod.volume(mount["name"]).get("claimTemplate")
    assert claim is not None, f"{pod}: recordings are not on a PersistentVolumeClaim"
    size = _quantity(claim["spec"]["resources"]["requests"]["storage"])
    kept = settings.retention.max_total_bytes
    assert kept is not None and kept + settings.rotate_bytes <= size, (
        f"{pod}: retention ({kept}) plus the open file ({settings.rotate_bytes}) exceeds the volume ({size})"
    )
    assert pod.security("fsGroup") is not None, f"{pod}: the volume is not made writable for the non-root user"


def _alerter_replicas_fault(replicas: int, settings: AlerterSettings) -> str:
    """Why the alerter cannot run with that many replicas ("" when it can): with windows in
    process its consumer acks by batch (AckPolicy.ALL), and a second replica's ack-all would ack
    calls the first has not stored the alerts of, each judging its own share of every window."""
    if replicas > 1 and settings.redis is None:
        return f"{replicas} alerter replicas with windows in process: set alerter.redis, or run one"
    return ""


def test_alerter_replicas_share_windows_through_redis(manifests: Manifests, tmp_path: Path) -> None:
    pod = manifests.pod("alerter")
    assert pod.workload["kind"] == "Deployment", f"{pod}: replicas need no identity of their own"
    fault = _alerter_replicas_fault(pod.replicas, pod.settings(tmp_path))
    assert not fault, f"{pod}: {fault}"


# A commented example of a service's key in a trawl.yaml: `  # <key>:` under the service's
# section, <key> one of its settings, and the lines after it indented deeper (`  #   ...`).
_EXAMPLE_START = re.compile(r"^  # (\w+):(?:\s|$)")
_EXAMPLE_MORE = re.compile(r"^  #   ")


def commented_examples(text: str) -> list[tuple[str, str, str]]:
    """(service, key, the text with that one block uncommented) for each commented example."""
    lines = text.splitlines(keepends=True)
    found: list[tuple[str, str, str]] = []
    section = ""
    for index, line in enumerate(lines):
        if top := re.match(r"^(\w+):", line):
            section = top.group(1)
        start = _EXAMPLE_START.match(line)
        if section not in SETTINGS or start is None or start.group(1) not in SETTINGS[section].model_fields:
            continue
        end = index + 1
        while end < len(lines) and _EXAMPLE_MORE.match(lines[end]):
            end += 1
        block = [re.sub(r"^  # ", "  ", block_line, count=1) for block_line in lines[index:end]]
        found.append((section, start.group(1), "".join(lines[:index] + block + lines[end:])))
    return found


@pytest.mark.parametrize("target", TARGETS)
def test_commented_examples_are_accepted(target: str, tmp_path: Path) -> None:
    """The keys trawl.yaml shows commented (routes, S3 shipping, the alerter's Redis...), once
    uncommented, are taken by the service they are under: they name real keys with valid values."""
    text = build(target, "assembled").named("ConfigMap", "trawl-config")["data"]["trawl.yaml"]
    examples = commented_examples(text)
    if target == "base":
        shown = {(service, key) for service, key, _ in examples}
        expected = {("enricher", "routes"), ("recorder", "s3"), ("alerter", "redis")}
        assert expected <= shown, f"{target}: trawl.yaml no longer shows {sorted(expected - shown)}"
    for number, (service, key, uncommented) in enumerate(examples):
        manifests = build(target, "assembled")
        manifests.named("ConfigMap", "trawl-config")["data"]["trawl.yaml"] = uncommented
        settings = manifests.pod(service).settings(tmp_path / str(number))
        default = SETTINGS[service].model_fields[key].get_default(call_default_factory=True)
        assert getattr(settings, key) != default, f"{target}: the commented {service}.{key} was not taken"


def test_alert_rules_configmap_compiles(manifests: Manifests, tmp_path: Path) -> None:
    pod = manifests.pod("alerter")
    settings = pod.settings(tmp_path)
    assert [rule.name for rule in settings.rules], f"{pod}: no rule"
    # load_rules on its own, with the container's environment (url_env/secret_env resolve there).
    rules = load_rules(settings.rules_file, environ=pod.env())
    assert [rule.name for rule in rules] == [rule.name for rule in settings.rules]


def test_enricher_may_read_what_it_maps(manifests: Manifests) -> None:
    pod = manifests.pod("enricher")
    account = pod.spec.get("serviceAccountName")
    assert account, f"{pod}: runs as the default service account"
    assert pod.spec.get("automountServiceAccountToken") is not False, f"{pod}: has no API token"
    namespace = pod.workload["metadata"].get("namespace")
    manifests.named("ServiceAccount", account, namespace)
    roles = [
        manifests.named("ClusterRole", binding["roleRef"]["name"])
        for binding in manifests.docs
        if binding["kind"] == "ClusterRoleBinding"
        and binding["roleRef"]["kind"] == "ClusterRole"
        and {"kind": "ServiceAccount", "name": account, "namespace": namespace} in binding.get("subjects", [])
    ]
    assert roles, f"{pod}: no ClusterRoleBinding for ServiceAccount {namespace}/{account}"
    granted = {
        (group, resource, verb)
        for role in roles
        for rule in role["rules"]
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }
    watched = {(resource.group, resource.plural) for resource in WATCHED}
    assert watched <= set(ENRICHER_READS), "the enricher watches a resource this test does not require"
    for group, resource in ENRICHER_READS:
        for verb in READ_VERBS:
            assert (group, resource, verb) in granted, f"{manifests}: the enricher cannot {verb} {group}/{resource}"
    assert {verb for _, _, verb in granted} <= READ_VERBS, f"{manifests}: the enricher may change objects"


def test_the_deployed_enricher_watches_the_cluster(manifests: Manifests, tmp_path: Path) -> None:
    pod = manifests.pod("enricher")
    settings = pod.settings(tmp_path)
    assert settings.kube_watch, f"{pod}: the enricher does not watch the cluster: every peer would be a bare IP"
    assert settings.kubeconfig is None, f"{pod}: a kubeconfig in a pod; the in-cluster service account is the way"
    readiness = next(c for c in pod.spec["containers"] if c["name"] == "enricher").get("readinessProbe", {})
    assert readiness.get("httpGet", {}).get("path") == "/readyz", f"{pod}: /readyz (the watch's state) unused"


def _lease_verbs_called() -> set[str]:
    """The RBAC verbs of the Lease calls services/enricher/shared.py makes (a watch is a list
    with watch=True, so `list` stands for both)."""
    calls = re.findall(r"\.(\w+?)_(?:namespaced_lease|lease_for_all_namespaces)\b", LEASE_SOURCE.read_text())
    unknown = sorted(set(calls) - set(LEASE_CALL_VERBS))
    assert not unknown, f"{LEASE_SOURCE}: Lease calls this test cannot map to RBAC verbs: {unknown}"
    verbs = {LEASE_CALL_VERBS[call] for call in calls}
    if "list" in verbs and re.search(r"\bWatch\(\)", LEASE_SOURCE.read_text()):
        verbs.add("watch")
    return verbs


def _rules_bound_to(manifests: Manifests, account: str, namespace: str) -> Iterator[Doc]:
    """The RBAC rules that apply to ServiceAccount namespace/account in `namespace`: Roles there
    through RoleBindings there, and ClusterRoles through either binding."""
    subject = {"kind": "ServiceAccount", "name": account, "namespace": namespace}
    for binding in manifests.docs:
        if subject not in binding.get("subjects", []):
            continue
        ref = binding["roleRef"]
        if binding["kind"] == "RoleBinding" and binding["metadata"].get("namespace") == namespace:
            role_namespace = namespace if ref["kind"] == "Role" else None
            yield from manifests.named(ref["kind"], ref["name"], role_namespace)["rules"]
        elif binding["kind"] == "ClusterRoleBinding" and ref["kind"] == "ClusterRole":
            yield from manifests.named("ClusterRole", ref["name"])["rules"]


def _redis_workloads(manifests: Manifests) -> list[Doc]:
    return [
        doc
        for doc in manifests.docs
        if doc["kind"] in WORKLOAD_KINDS
        and any(_image_name(c["image"]) == "redis" for c in doc["spec"]["template"]["spec"]["containers"])
    ]


def test_enricher_replicas_share_one_watch_through_redis_and_a_lease(manifests: Manifests, tmp_path: Path) -> None:
    """More than one enricher only with identity shared through Redis (one watch on the API
    server, shared.py): production runs several, with a Redis Service of its own and a Role for
    exactly the Lease calls shared.py makes; the base and dev run one, with neither."""
    pod = manifests.pod("enricher")
    settings = pod.settings(tmp_path)
    account = pod.spec["serviceAccountName"]
    namespace = str(pod.workload["metadata"].get("namespace"))
    lease_namespace = settings.lease_namespace or pod.env().get("POD_NAMESPACE") or namespace
    lease_rules = [
        rule
        for rule in _rules_bound_to(manifests, account, lease_namespace)
        if {"coordination.k8s.io", "*"} & set(rule.get("apiGroups", []))
        and {"leases", "*"} & set(rule.get("resources", []))
    ]
    if manifests.target == "overlays/production":
        assert pod.replicas > 1, f"{pod}: one enricher replica; production runs a standby"
    if pod.replicas == 1:
        assert settings.identity_redis_url is None, f"{pod}: one replica shares identity through Redis"
        assert not _redis_workloads(manifests), f"{manifests}: a Redis no enricher needs"
        assert not lease_rules, f"{manifests}: the single enricher may change Leases"
        return
    # Several replicas: without Redis each would watch the cluster on its own.
    assert settings.identity_redis_url, f"{pod}: {pod.replicas} replicas, each watching the API server"
    url = urlsplit(settings.identity_redis_url)
    assert url.scheme in ("redis", "rediss"), f"{pod}: identity_redis_url {url.geturl()} is not a Redis URL"
    name, _, rest = (url.hostname or "").partition(".")
    service = manifests.named("Service", name, rest.split(".")[0] if rest else namespace)
    port = url.port or 6379
    (target_port,) = [p.get("targetPort", p["port"]) for p in service["spec"]["ports"] if p["port"] == port]
    selected = [
        doc
        for doc in _redis_workloads(manifests)
        if service["spec"]["selector"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(selected) == 1, f"{manifests}: Service {name} leads to {len(selected)} Redis workloads"
    redis = selected[0]
    (container,) = [c for c in redis["spec"]["template"]["spec"]["containers"] if _image_name(c["image"]) == "redis"]
    ports = {p.get("name", p["containerPort"]): p["containerPort"] for p in container["ports"]}
    assert target_port in ports or target_port in ports.values(), (
        f"{manifests}: Service {name} port {port} leads to no Redis port"
    )
    # One server, never two behind the Service (a surge would split writes from reads).
    assert redis["spec"].get("replicas", 1) == 1, f"{manifests}: more than one Redis behind one Service"
    if redis["kind"] == "Deployment":
        assert redis["spec"].get("strategy", {}).get("type") == "Recreate", f"{manifests}: Redis surges in updates"
    tag = container["image"].split("@")[0].rsplit(":", 1)[-1] if ":" in container["image"] else ""
    assert "@sha256:" in container["image"] or re.match(r"\d+\.\d+\.\d+", tag), f"{container['image']}: not pinned"
    # No password: a NetworkPolicy lets only the enrichers reach its port.
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    enricher_labels = pod.workload["spec"]["template"]["metadata"]["labels"]
    policies = [
        doc
        for doc in manifests.docs
        if doc["kind"] == "NetworkPolicy"
        and doc["spec"]["podSelector"].get("matchLabels", {}).items() <= redis_labels.items()
    ]
    assert policies, f"{manifests}: every pod in the namespace may write the identity Redis"
    for policy in policies:
        assert "Ingress" in policy["spec"].get("policyTypes", ["Ingress"])
        for rule in policy["spec"].get("ingress", []):
            sources = rule.get("from", [])
            assert sources, f"{manifests}: NetworkPolicy {policy['metadata']['name']} admits every source"
            for source in sources:
                selector = source.get("podSelector", {}).get("matchLabels")
                assert selector is not None and set(source) == {"podSelector"}, f"{manifests}: {source} is not a pod"
                assert selector.items() <= enricher_labels.items(), f"{manifests}: {selector} are not the enrichers"
            assert {p["port"] for p in rule.get("ports", [])} <= {target_port, *ports.values()}, (
                f"{manifests}: NetworkPolicy {policy['metadata']['name']} opens other ports"
            )
    limits = container.get("resources", {}).get("limits", {})
    assert {"cpu", "memory"} <= set(limits), f"{manifests}: Redis without cpu and memory limits"
    args = container.get("args", [])
    assert "--maxmemory" in args, f"{manifests}: Redis grows until the kubelet kills it"
    maxmemory = _quantity(args[args.index("--maxmemory") + 1])
    assert maxmemory < _quantity(limits["memory"]), f"{manifests}: Redis's maxmemory is above its memory limit"
    # The Lease: exactly the verbs of shared.py's calls, get/update at least on its name.
    called = _lease_verbs_called()
    assert {"get", "create", "update"} <= called, f"{LEASE_SOURCE}: the Lease calls were not found"
    granted: set[str] = set()
    for rule in lease_rules:
        names = rule.get("resourceNames")
        for verb in rule.get("verbs", []):
            granted.add(verb)
            assert names is None or verb != "create", f"{manifests}: create with resourceNames is never allowed"
            assert names is None or settings.lease_name in names, f"{manifests}: {verb} on other Leases than ours"
    assert granted == called, f"{manifests}: Lease verbs granted {sorted(granted)}, shared.py calls {sorted(called)}"


def test_services_reach_nats_and_streams_fit_its_volume(manifests: Manifests, tmp_path: Path) -> None:
    nats = manifests.named("StatefulSet", "nats")
    nats_pod = nats["spec"]["template"]
    config_maps = [v["configMap"]["name"] for v in nats_pod["spec"]["volumes"] if "configMap" in v]
    store = manifests.named("ConfigMap", config_maps[0])["data"]["nats.conf"]
    match = re.search(r"max_file_store:\s*(\S+)", store)
    assert match, f"{manifests}: nats.conf sets no JetStream max_file_store"
    max_file_store = _quantity(match.group(1))
    memory = re.search(r"max_memory_store:\s*(\S+)", store)
    assert memory, f"{manifests}: nats.conf sets no JetStream max_memory_store (the packet window lives there)"
    max_memory_store = _quantity(memory.group(1))
    memory_limit = _quantity(nats_pod["spec"]["containers"][0]["resources"]["limits"]["memory"])
    assert max_memory_store < memory_limit, f"{manifests}: the packet window would outgrow the NATS pod"
    volume = _quantity(nats["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"])
    assert max_file_store <= volume, f"{manifests}: JetStream may store {max_file_store} on a {volume} volume"
    container_ports = [p for c in nats_pod["spec"]["containers"] for p in c["ports"]]
    nats_ports = {p.get("name", p["containerPort"]): p["containerPort"] for p in container_ports}
    for pod in manifests.pods():
        settings = pod.settings(tmp_path)
        # The three streams (calls, enriched calls, alerts) each up to streams.max_bytes.
        assert 3 * settings.streams.max_bytes <= max_file_store, f"{pod}: streams outgrow max_file_store"
        # The packet window (TRAWL_PACKETS), in memory unless packet_retention.storage says file.
        window = settings.packet_retention
        store_limit = max_memory_store if window.storage == "memory" else max_file_store
        assert window.max_bytes <= store_limit, f"{pod}: packet_retention.max_bytes outgrows the JetStream store"
        for server in settings.nats.servers:
            url = urlsplit(server)
            name, _, rest = (url.hostname or "").partition(".")
            namespace = rest.split(".")[0] if rest else pod.workload["metadata"].get("namespace")
            service = manifests.named("Service", name, namespace)
            assert service["spec"]["selector"].items() <= nats_pod["metadata"]["labels"].items(), f"{server}: not NATS"
            targets = [p.get("targetPort", p["port"]) for p in service["spec"]["ports"] if p["port"] == url.port]
            assert targets, f"{pod}: {server}: the Service has no port {url.port}"
            assert nats_ports.get(targets[0], targets[0]) in nats_ports.values(), f"{server}: leads to no NATS port"


@pytest.mark.parametrize("mode", MODES)
def test_dev_sends_spans_to_its_jaeger(mode: str, tmp_path: Path) -> None:
    manifests = build("overlays/dev", mode)
    pod = manifests.pod("enricher")
    settings = pod.settings(tmp_path)
    # The OTEL_* variables are read when the exporter is made: in the container's environment.
    with pod.environment():
        target = settings.traces_target()
        metrics_target = settings.metrics_target()
    assert target is not None, "the dev enricher exports no spans"
    url = urlsplit(target.endpoint)
    service = manifests.named("Service", url.hostname or "", "trawl")
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    assert settings.protocol == "grpc" and url.port == 4317
    jaeger = manifests.named("Deployment", "jaeger", "trawl")
    assert service["spec"]["selector"].items() <= jaeger["spec"]["template"]["metadata"]["labels"].items()
    assert metrics_target is None, "Jaeger takes no OTLP metrics"


# ---- the image ----


def _dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), one list per stage."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_builds_one_runnable_image() -> None:
    stages = _dockerfile_stages()
    assert stages, "no FROM"
    runtime = stages[-1]
    text = "\n".join(runtime)
    assert 'ENTRYPOINT ["trawl"]' in runtime
    packages = set(re.findall(r"[a-z0-9][a-z0-9.+-]*", " ".join(i for i in runtime if "apt-get install" in i)))
    assert {"libpcap0.8", "iproute2"} <= packages, "the collector needs libpcap0.8 and iproute2"
    assert {"libnghttp2-14", "libhiredis0.14"} <= packages, "the dissector's compiled lane links libnghttp2, libhiredis"
    build = "\n".join(i for stage in stages[:-1] for i in stage)
    assert "libnghttp2-dev" in build and "libhiredis-dev" in build, "the lane's build needs their headers"
    all_text = "\n".join(i for stage in stages for i in stage)
    assert re.search(r"pip (install|wheel)\b.*(\s\.|kubetrawl)", all_text), "the package is not installed"
    assert not re.search(r"pip install[^\n]*\bbcc\b", all_text), "PyPI's bcc is an unrelated package"
    users = [i.split()[1] for i in runtime if i.upper().startswith("USER ")]
    assert users, "the image runs as root"
    uid = int(users[-1].split(":")[0])
    assert uid != 0
    assert re.search(rf"useradd\b.*--uid {uid}\b", text), f"no user {uid} in the image"
    for pod in Manifests("base", "assembled", assemble(DEPLOY / "base")).pods():
        if pod.service != "collector":
            assert pod.security("runAsUser") == uid, f"{pod}: runs as another user than the image's {uid}"


def _ignored(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rules: a match on the path or a parent excludes it; `!` re-includes; last wins."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        compiled = regex(raw.lstrip("!").strip("/"))
        if any(compiled.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest() -> None:
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = ["pyproject.toml", "setup.py", pyproject["project"]["readme"]]
    for folder in set(pyproject["tool"]["setuptools"]["package-dir"].values()):
        for directory, subdirs, names in os.walk(ROOT / folder):
            subdirs[:] = [d for d in subdirs if d != "__pycache__"]
            needed += [
                str(Path(directory, name).relative_to(ROOT))
                for name in names
                if name.endswith((".py", ".pyi", ".c", ".typed"))
            ]
    assert "services/collector/_ring.c" in needed
    kept_out = sorted({path for path in needed if _ignored(patterns, path)})
    assert not kept_out, f"the build context lacks {kept_out}"
    for path in (".git/HEAD", ".venv/bin/python", "services/collector/_ring.cpython-311-x86_64-linux-gnu.so"):
        assert _ignored(patterns, path), f"{path} would be sent to the builder"


def test_helpers_of_this_file() -> None:
    """The parsers above decide what passes: check them on known answers."""
    assert _quantity("10Gi") == 10 << 30 and _quantity("9GB") == 9 << 30 and _quantity("500M") == 500_000_000
    assert _subject_matches("trawl.v1.packets.*.1", "trawl.v1.packets.node-a.1")
    assert not _subject_matches("trawl.v1.packets.*.1", "trawl.v1.packets.node-a.10")
    assert _subject_matches("trawl.v1.packets.>", "trawl.v1.packets.node-a.0")
    assert _expand("a.$(X).$$(X).$(Y)", {"X": "1"}) == "a.1.$(X).$(Y)"
    assert _ignored(["build", "!build/keep"], "build/x") and not _ignored(["build", "!build/keep"], "build/keep")
    assert _ignored(["**/*.so"], "a/b/c.so") and not _ignored(["*.so"], "a/c.so")
    dev = Manifests("overlays/dev", "assembled", assemble(DEPLOY / "overlays" / "dev"))
    assert dev.named("Deployment", "dissector", "trawl")["spec"]["replicas"] == 1
    dev_config = (DEPLOY / "overlays" / "dev" / "trawl.yaml").read_text()
    assert dev.named("ConfigMap", "trawl-config", "trawl")["data"] == {"trawl.yaml": dev_config}
    assert dev.pod("collector").env() == {"TRAWL_COLLECTOR_NODE": SAMPLE_NODE}
    example = "enricher:\n  kube_watch: true\n  # Prose: not a key\n  # routes:\n  #   enabled: false\nalerter:\n"
    assert commented_examples(example) == [
        (
            "enricher",
            "routes",
            "enricher:\n  kube_watch: true\n  # Prose: not a key\n  routes:\n    enabled: false\nalerter:\n",
        )
    ]
    assert commented_examples("recorder:\n  # nothing: here\n") == []
    alone = AlerterSettings.model_validate({})
    shared = AlerterSettings.model_validate({"redis": {"url": "redis://alerter-redis:6379/0"}})
    assert _alerter_replicas_fault(1, alone) == "" and _alerter_replicas_fault(3, shared) == ""
    assert "alerter.redis" in _alerter_replicas_fault(2, alone)
