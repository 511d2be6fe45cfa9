#!/usr/bin/env python3
"""Checks for the controller's deployment files, run by validate.sh (which installs kubernetes-validate).

  check.py k8s FILE...          every object against the Kubernetes JSON schemas (strict: unknown fields
                                fail, and so does a kind with no schema), then the rules below
  check.py same RENDERED FILE...  the Helm chart's rendering equals the plain manifests (Helm's own labels
                                and checksum annotations aside)
  check.py compose CONFIG.json  `docker compose config --format json` of deploy/compose/compose.yaml

Rules: selectors match the pod's labels; Services and probes name container ports that exist; every object
a pod refers to is there (or optional); the pod is locked down (non-root, read-only root, no privilege
escalation, every capability dropped, RuntimeDefault seccomp) with resource requests and limits; the probes
are /healthz and /readyz over HTTPS; and the controller's environment names only variables the controller
reads (taken from its flag definitions in controller/src/bin/alki-controller.rs), none of them empty.
Exit status 1 when anything fails, with one line per problem.
"""
import argparse
import copy
import json
import os
import re
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONTROLLER_FLAGS = os.path.join(ROOT, "controller", "src", "bin", "alki-controller.rs")
# Variables the controller's container may have besides its own ALKI_* ones.
OTHER_ENV = {"RUST_LOG", "NO_COLOR"}
SECRET_MOUNT = "/etc/alki/secret/"

problems = []


def problem(where, text):
    problems.append(f"{where}: {text}")


def load(paths):
    objects = []
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    objects.append((path, doc))
    return objects


def name_of(obj):
    return f"{obj.get('kind', '?')}/{obj.get('metadata', {}).get('name', '?')}"


def controller_env_names():
    with open(CONTROLLER_FLAGS) as f:
        names = set(re.findall(r'env\s*=\s*"(ALKI_[A-Z0-9_]+)"', f.read()))
    if len(names) < 10:
        raise SystemExit(f"found only {len(names)} ALKI_* variables in {CONTROLLER_FLAGS}: has it moved?")
    return names


def check_schemas(objects, versions):
    import kubernetes_validate

    for path, obj in objects:
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except Exception as e:  # ValidationError, SchemaNotFoundError, ...: all are failures here
                where = ".".join(str(p) for p in getattr(e, "path", []) or [])
                message = getattr(e, "message", None) or str(e)
                problem(f"{path} {name_of(obj)}", f"Kubernetes {version} schema: {where}: {message}")


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_env(where, env, secret_keys):
    """env: name -> value (None for valueFrom). secret_keys: the mounted Secret's keys, or None if unknown."""
    known = controller_env_names()
    for name, value in env.items():
        if name not in known and name not in OTHER_ENV:
            problem(where, f"{name} is not a variable alki-controller reads (see alki-controller --help)")
        if value is not None and str(value) == "":
            problem(where, f"{name} is empty: the controller refuses an empty variable; leave it out")
        if value is not None and secret_keys is not None:
            for path in str(value).split(","):
                if path.startswith(SECRET_MOUNT) and path[len(SECRET_MOUNT):] not in secret_keys:
                    problem(where, f"{name} names {path}, but the Secret has no key {path[len(SECRET_MOUNT):]}")


def check_pod(where, template, by_kind):
    spec = template.get("spec", {})
    labels = template.get("metadata", {}).get("labels", {})
    pod_sc = spec.get("securityContext", {})
    if spec.get("automountServiceAccountToken") is not False:
        problem(where, "automountServiceAccountToken must be false (the controller never calls the API)")
    sa = spec.get("serviceAccountName")
    if sa and sa not in by_kind.get("ServiceAccount", {}):
        problem(where, f"serviceAccountName {sa} is not among the manifests")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    secret_keys = None
    for v in volumes.values():
        if "secret" in v:
            secret = by_kind.get("Secret", {}).get(v["secret"]["secretName"])
            if secret is None and not v["secret"].get("optional"):
                problem(where, f"volume {v['name']}: Secret {v['secret']['secretName']} is not among the manifests")
            if secret is not None:
                secret_keys = set(secret.get("data") or {}) | set(secret.get("stringData") or {})
        if "configMap" in v and v["configMap"]["name"] not in by_kind.get("ConfigMap", {}):
            if not v["configMap"].get("optional"):
                problem(where, f"volume {v['name']}: ConfigMap {v['configMap']['name']} is not among the manifests")
    claims = {c["metadata"]["name"] for c in template.get("_claims", [])}
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        cw = f"{where} container {c['name']}"
        sc = c.get("securityContext", {})
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            problem(cw, "runAsNonRoot must be true")
        if (sc.get("runAsUser", pod_sc.get("runAsUser")) or 0) == 0:
            problem(cw, "runAsUser must be set and not 0")
        if sc.get("readOnlyRootFilesystem") is not True:
            problem(cw, "readOnlyRootFilesystem must be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problem(cw, "allowPrivilegeEscalation must be false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get("capabilities", {}).get("add"):
            problem(cw, "capabilities must drop ALL and add none")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        if seccomp.get("type") != "RuntimeDefault":
            problem(cw, "seccompProfile must be RuntimeDefault")
        resources = c.get("resources", {})
        for part in ("requests", "limits"):
            for res in ("cpu", "memory"):
                if res not in resources.get(part, {}):
                    problem(cw, f"resources.{part}.{res} is missing")
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", None)):
            p = c.get(probe)
            if p is None:
                if probe != "startupProbe":
                    problem(cw, f"{probe} is missing")
                continue
            get = p.get("httpGet", {})
            if path and get.get("path") != path:
                problem(cw, f"{probe} must GET {path}")
            if get.get("scheme") != "HTTPS":
                problem(cw, f"{probe} must use scheme HTTPS: the controller serves TLS on its HTTP port")
            if get.get("port") not in ports and get.get("port") not in ports.values():
                problem(cw, f"{probe} names port {get.get('port')!r}, which the container does not have")
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes and m["name"] not in claims:
                problem(cw, f"volumeMount {m['name']} has no volume or claim template")
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        for source in c.get("envFrom", []):
            if "configMapRef" in source:
                cm = by_kind.get("ConfigMap", {}).get(source["configMapRef"]["name"])
                if cm is None:
                    problem(cw, f"envFrom ConfigMap {source['configMapRef']['name']} is not among the manifests")
                else:
                    for k, v in (cm.get("data") or {}).items():
                        if k in env:
                            problem(cw, f"{k} is set both in the pod and in ConfigMap {name_of(cm)}")
                        env[k] = v
            if "secretRef" in source:
                problem(cw, "envFrom a Secret: the controller reads secrets from files, name them in the ConfigMap")
        check_env(cw, env, secret_keys)
        for var, port_name in (("ALKI_GRPC_ADDR", "grpc"), ("ALKI_HTTP_ADDR", "https")):
            addr = env.get(var)
            if addr is None or port_name not in ports or not str(addr).endswith(f":{ports[port_name]}"):
                problem(cw, f"{var} ({addr}) must listen on the container port named {port_name} ({ports.get(port_name)})")
    return labels, {p["name"]: p for c in spec.get("containers", []) for p in c.get("ports", []) if "name" in p}


def check_rules(objects):
    by_kind = {}
    for path, obj in objects:
        key = obj.get("metadata", {}).get("name")
        if key in by_kind.setdefault(obj.get("kind"), {}):
            problem(path, f"{name_of(obj)} is defined twice")
        by_kind[obj.get("kind")][key] = obj
    pods = []  # (workload, labels, named ports)
    for path, obj in objects:
        if obj.get("kind") not in ("StatefulSet", "Deployment"):
            continue
        where = f"{path} {name_of(obj)}"
        spec = obj["spec"]
        template = copy.deepcopy(spec["template"])
        template["_claims"] = spec.get("volumeClaimTemplates", [])
        labels, ports = check_pod(where, template, by_kind)
        if not selects(spec.get("selector", {}).get("matchLabels"), labels):
            problem(where, "selector.matchLabels does not match the pod template's labels")
        if obj["kind"] == "StatefulSet":
            if spec.get("replicas") != 1:
                problem(where, "replicas must be 1: the embedded store has one writer")
            governing = by_kind.get("Service", {}).get(spec.get("serviceName"))
            if governing is None or governing["spec"].get("clusterIP") != "None":
                problem(where, f"serviceName {spec.get('serviceName')} must be a headless Service in the manifests")
            for claim in spec.get("volumeClaimTemplates", []):
                if "storage" not in claim.get("spec", {}).get("resources", {}).get("requests", {}):
                    problem(where, f"volumeClaimTemplate {claim['metadata']['name']} requests no storage")
        pods.append((where, labels, ports))
    if not pods:
        problem("manifests", "no StatefulSet or Deployment found")
    for path, obj in objects:
        where = f"{path} {name_of(obj)}"
        if obj.get("kind") == "Service":
            matched = [p for p in pods if selects(obj["spec"].get("selector"), p[1])]
            if not matched:
                problem(where, "its selector matches no pod of the manifests")
            for port in obj["spec"].get("ports", []):
                target = port.get("targetPort", port.get("port"))
                for _, _, named in matched:
                    if isinstance(target, str) and target not in named:
                        problem(where, f"port {port.get('name')}: targetPort {target} is not a container port")
                    if isinstance(target, int) and target not in [p["containerPort"] for p in named.values()]:
                        problem(where, f"port {port.get('name')}: targetPort {target} is not a container port")
        if obj.get("kind") == "PodDisruptionBudget":
            if not any(selects(obj["spec"].get("selector", {}).get("matchLabels"), p[1]) for p in pods):
                problem(where, "its selector matches no pod of the manifests")


# Labels and annotations only Helm adds (release bookkeeping, restart-on-change checksums).
HELM_ONLY_LABELS = {"helm.sh/chart", "app.kubernetes.io/managed-by"}


def normalize(obj):
    obj = copy.deepcopy(obj)

    def strip(meta):
        if not isinstance(meta, dict):
            return
        labels = {k: v for k, v in (meta.get("labels") or {}).items() if k not in HELM_ONLY_LABELS}
        annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if not k.startswith("checksum/")}
        meta.pop("labels", None)
        meta.pop("annotations", None)
        if labels:
            meta["labels"] = labels
        if annotations:
            meta["annotations"] = annotations

    strip(obj.get("metadata"))
    strip(obj.get("spec", {}).get("template", {}).get("metadata"))
    return obj


def check_same(rendered_path, plain_paths):
    rendered = {name_of(o): normalize(o) for _, o in load([rendered_path])}
    plain = {name_of(o): normalize(o) for _, o in load(plain_paths)}
    for key in sorted(set(rendered) | set(plain)):
        if key not in plain:
            problem("helm", f"{key} is rendered by the chart but is not in deploy/kubernetes")
        elif key not in rendered:
            problem("helm", f"{key} is in deploy/kubernetes but the chart does not render it")
        elif rendered[key] != plain[key]:
            diff = first_difference(plain[key], rendered[key], key)
            problem("helm", f"the chart's default rendering differs from deploy/kubernetes: {diff}")


def first_difference(a, b, path):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_difference(x, y, f"{path}[{i}]")
    return f"{path}: manifests {json.dumps(a)}, chart {json.dumps(b)}"


def check_compose(config_path):
    with open(config_path) as f:
        config = json.load(f)
    services = config.get("services", {})
    if "controller" not in services:
        problem("compose", "no service named controller")
    for name, service in services.items():
        where = f"compose service {name}"
        if service.get("read_only") is not True:
            problem(where, "read_only must be true")
        if "ALL" not in (service.get("cap_drop") or []):
            problem(where, "cap_drop must hold ALL")
        if not any(str(o).startswith("no-new-privileges") for o in service.get("security_opt") or []):
            problem(where, "security_opt must hold no-new-privileges:true")
        user = str(service.get("user", ""))
        one_shot = service.get("restart") == "no" and service.get("network_mode") == "none"
        if not one_shot and (user == "" or user.split(":")[0] in ("0", "root")):
            problem(where, "must run as a non-root user (only the one-shot volume-init runs as root)")
        for mount in service.get("volumes") or []:
            if mount.get("type") == "volume" and mount.get("source") not in (config.get("volumes") or {}):
                problem(where, f"volume {mount.get('source')} is not a named volume of the project")
    controller = services.get("controller", {})
    env = controller.get("environment") or {}
    check_env("compose service controller", env, None)
    for var, port in (("ALKI_GRPC_ADDR", 7070), ("ALKI_HTTP_ADDR", 7080)):
        published = [p.get("target") for p in controller.get("ports") or []]
        if not str(env.get(var, "")).endswith(f":{port}") or port not in published:
            problem("compose service controller", f"{var} must listen on {port}, and {port} must be published")
    if "ALKI_EXTERNAL_REGISTRIES" not in env:
        problem("compose service controller", "ALKI_EXTERNAL_REGISTRIES must name the registry service")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    k8s = sub.add_parser("k8s")
    k8s.add_argument("--kubernetes-version", action="append", required=True)
    k8s.add_argument("files", nargs="+")
    same = sub.add_parser("same")
    same.add_argument("rendered")
    same.add_argument("files", nargs="+")
    compose = sub.add_parser("compose")
    compose.add_argument("config")
    args = parser.parse_args()
    if args.command == "k8s":
        objects = load(args.files)
        if not objects:
            problem(" ".join(args.files), "no objects")
        check_schemas(objects, args.kubernetes_version)
        check_rules(objects)
        summary = f"{len(objects)} objects valid against Kubernetes {', '.join(args.kubernetes_version)} and the rules"
    elif args.command == "same":
        check_same(args.rendered, args.files)
        summary = "the chart's default rendering equals the manifests"
    else:
        check_compose(args.config)
        summary = "compose services follow the rules"
    for p in problems:
        print(f"  FAIL {p}")
    if problems:
        return 1
    print(f"  ok: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
