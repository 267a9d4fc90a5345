#!/usr/bin/env python3
"""Checks deploy/: every overlay renders, every object validates, the security rules hold.

    python3 deploy/check/check.py [--kubectl KUBECTL] [--kubernetes-version V ...]

1. `kubectl kustomize` renders deploy/base and every overlay.
2. Every rendered object validates against the OpenAPI schemas of Kubernetes 1.30
   and 1.37 (kubernetes-validate, offline, strict: unknown fields fail); custom
   resources and the examples in deploy/examples validate against the generated
   CRDs (crschema.py).
3. The security rules below hold for every rendered workload; a self-test first
   proves that each rule catches a manifest that breaks it.

Exit status 0 when everything passes, 1 otherwise (each problem on its own line).
"""
import argparse
import copy
import os
import subprocess
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
DEPLOY = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import crschema  # noqa: E402

RENDERED = ["base", "overlays/cluster-gateway", "overlays/node", "overlays/egress-gateway"]

# The capabilities each component's container gets, exactly (README: "Run it on
# Kubernetes"). Everything else is dropped; nothing is privileged.
CAPABILITIES = {
    "isthmus-clustermesh-api": [],
    "isthmus-gateway": ["NET_ADMIN"],
    "isthmus-node": ["NET_ADMIN", "BPF"],
    "isthmus-egress": ["NET_ADMIN"],
}
# Components that need the host's network namespace.
HOST_NETWORK = {"isthmus-node", "isthmus-egress"}
# The only component that talks to the Kubernetes API; the others mount no token.
API_CLIENTS = {"isthmus-clustermesh-api"}
# The only host path a workload may mount.
HOST_PATHS = {"/dev/net/tun"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}


def render(kubectl, path):
    out = subprocess.run([kubectl, "kustomize", os.path.join(DEPLOY, path)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"kubectl kustomize {path} failed:\n{out.stderr}")
    warnings = [l for l in out.stderr.splitlines() if l.strip()]
    return [d for d in yaml.safe_load_all(out.stdout) if d], warnings


def load_yaml_dir(path):
    docs = []
    for name in sorted(os.listdir(path)):
        if name.endswith(".yaml"):
            with open(os.path.join(path, name)) as f:
                docs.extend((name, d) for d in yaml.safe_load_all(f) if d)
    return docs


def ident(d):
    return "%s/%s" % (d.get("kind"), (d.get("metadata") or {}).get("name"))


def schema_problems(docs, version, crds, custom=True):
    """Built-in kinds against Kubernetes' schemas, custom resources (unless `custom` is
    false) against the CRDs."""
    import kubernetes_validate as kv
    from kubernetes_validate.utils import SchemaNotFoundError

    problems = []
    for d in docs:
        try:
            kv.validate(d, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(map(str, e.absolute_path))
            problems.append(f"{ident(d)}: {path}: {e.message}")
        except SchemaNotFoundError as e:
            crd = crds.get((d["apiVersion"].rpartition("/")[0], d["kind"]))
            if crd is not None and not custom:
                continue
            if crd is None:
                problems.append(f"{ident(d)}: {e.message} (and no CRD for it)")
            else:
                problems.extend(f"{ident(d)}: {m}" for m in crschema.cr_errors(d, crd))
    return problems


def containers(pod_spec):
    return (pod_spec.get("initContainers") or []) + (pod_spec.get("containers") or [])


def security_problems(docs):
    """The rules a reviewer checks by hand, for every rendered workload."""
    problems = []
    accounts = {(d["metadata"].get("namespace"), d["metadata"]["name"])
                for d in docs if d.get("kind") == "ServiceAccount"}
    used_by = {}
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    budgets = [d for d in docs if d.get("kind") == "PodDisruptionBudget"]
    for d in docs:
        if d.get("kind") == "Secret":
            problems.append(f"{ident(d)}: Secrets are referenced by name, never rendered")
        if d.get("kind") not in WORKLOADS:
            continue
        name = d["metadata"]["name"]
        ns = d["metadata"].get("namespace")
        pod = d["spec"]["template"]["spec"]
        labels = d["spec"]["template"]["metadata"].get("labels", {})
        w = ident(d)
        if name not in CAPABILITIES:
            problems.append(f"{w}: not a documented component ({sorted(CAPABILITIES)})")
            continue
        sa = pod.get("serviceAccountName")
        if not sa or sa == "default":
            problems.append(f"{w}: has no service account of its own")
        elif (ns, sa) not in accounts:
            problems.append(f"{w}: service account {sa} is not part of the manifests")
        elif sa in used_by and used_by[sa] != name:
            problems.append(f"{w}: shares service account {sa} with {used_by[sa]}")
        else:
            used_by[sa] = name
        if pod.get("hostPID") or pod.get("hostIPC"):
            problems.append(f"{w}: uses the host's PID or IPC namespace")
        if bool(pod.get("hostNetwork")) != (name in HOST_NETWORK):
            problems.append(f"{w}: hostNetwork is {bool(pod.get('hostNetwork'))}, "
                            f"documented {name in HOST_NETWORK}")
        for v in pod.get("volumes") or []:
            hp = (v.get("hostPath") or {}).get("path")
            if hp is not None and hp not in HOST_PATHS:
                problems.append(f"{w}: mounts host path {hp}")
        pod_sc = pod.get("securityContext") or {}
        if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{w}: no RuntimeDefault seccomp profile")
        if name not in API_CLIENTS and pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{w}: mounts a service account token it never uses")
        for c in containers(pod):
            cw = f"{w} container {c['name']}"
            sc = c.get("securityContext") or {}
            if sc.get("privileged"):
                problems.append(f"{cw}: privileged: true")
            if sc.get("seccompProfile", {}).get("type", "RuntimeDefault") != "RuntimeDefault":
                problems.append(f"{cw}: seccomp profile {sc['seccompProfile']['type']}")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cw}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cw}: root filesystem is writable")
            caps = sc.get("capabilities") or {}
            if caps.get("drop") != ["ALL"]:
                problems.append(f"{cw}: does not drop ALL capabilities")
            added = sorted(caps.get("add") or [])
            if added != sorted(CAPABILITIES[name]):
                problems.append(f"{cw}: capabilities {added}, documented "
                                f"{sorted(CAPABILITIES[name])}")
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(part) or {}):
                        problems.append(f"{cw}: no {part}.{r}")
            if "readinessProbe" not in c or "livenessProbe" not in c:
                problems.append(f"{cw}: needs readiness and liveness probes")
        if name not in HOST_NETWORK and not any(
                _selects(p["spec"].get("podSelector", {}), labels) for p in policies):
            problems.append(f"{w}: no NetworkPolicy selects its pods")
        # Node drains skip DaemonSet pods, so a budget means nothing there; their
        # rolling updates must take one node at a time instead.
        if d["kind"] == "DaemonSet":
            rolling = (d["spec"].get("updateStrategy") or {}).get("rollingUpdate") or {}
            if rolling.get("maxUnavailable") != 1:
                problems.append(f"{w}: rolling update must take one node at a time")
        elif d["spec"].get("replicas", 1) > 1 and not any(
                _selects(b["spec"].get("selector", {}), labels) for b in budgets):
            problems.append(f"{w}: no PodDisruptionBudget")
    return problems


def _selects(selector, labels):
    want = selector.get("matchLabels") or {}
    return bool(want) and all(labels.get(k) == v for k, v in want.items())


def self_test(docs, version):
    """Each security rule must catch a manifest that breaks it."""
    if security_problems(docs):
        return ["self-test: the unmodified manifests must pass"]
    failures = []

    def workload(ds, kind):
        return next(d for d in ds if d.get("kind") == kind)

    def pod(d):
        return d["spec"]["template"]["spec"]

    breaks = {
        "privileged": lambda ds: pod(workload(ds, "StatefulSet"))["containers"][0]
        ["securityContext"].__setitem__("privileged", True),
        "an extra capability": lambda ds: pod(workload(ds, "StatefulSet"))["containers"][0]
        ["securityContext"]["capabilities"]["add"].append("SYS_ADMIN"),
        "no resources": lambda ds: pod(workload(ds, "Deployment"))["containers"][0]
        .pop("resources"),
        "a shared service account": lambda ds: pod(workload(ds, "StatefulSet"))
        .__setitem__("serviceAccountName", "isthmus-clustermesh-api"),
        "the default service account": lambda ds: pod(workload(ds, "Deployment"))
        .pop("serviceAccountName"),
        "a host path": lambda ds: pod(workload(ds, "StatefulSet"))["volumes"].append(
            {"name": "root", "hostPath": {"path": "/"}}),
        "an unconfined container": lambda ds: pod(workload(ds, "StatefulSet"))["containers"][0]
        ["securityContext"].__setitem__("seccompProfile", {"type": "Unconfined"}),
        "a mounted token": lambda ds: pod(workload(ds, "StatefulSet"))
        .pop("automountServiceAccountToken"),
        "a rendered Secret": lambda ds: ds.append(
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "k"}}),
        "no network policy": lambda ds: [ds.remove(p) for p in
                                         [d for d in ds if d.get("kind") == "NetworkPolicy"]],
    }
    breaks["no budget"] = lambda ds: [ds.remove(p) for p in
                                      [d for d in ds if d.get("kind") == "PodDisruptionBudget"]]
    for what, breaker in breaks.items():
        broken = copy.deepcopy(docs)
        breaker(broken)
        if not security_problems(broken):
            failures.append(f"self-test: a manifest with {what} was not caught")
    # The schema check refuses an unknown field and a wrong type.
    for what, breaker in {
        "an unknown container field": lambda ds: pod(workload(ds, "StatefulSet"))
        ["containers"][0].__setitem__("privileges", True),
        "a wrong type": lambda ds: workload(ds, "StatefulSet")["spec"]
        .__setitem__("replicas", "two"),
    }.items():
        broken = copy.deepcopy(docs)
        breaker(broken)
        if not schema_problems([workload(broken, "StatefulSet")], version, {}):
            failures.append(f"self-test: a manifest with {what} validated")
    return failures


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kubectl", default=os.environ.get("KUBECTL", "kubectl"))
    # The oldest and the newest Kubernetes this release supports.
    ap.add_argument("--kubernetes-version", action="append",
                    help="validate against these versions' schemas (default: 1.30 and 1.37)")
    a = ap.parse_args()
    a.kubernetes_version = a.kubernetes_version or ["1.30", "1.37"]

    crd_docs = [d for _, d in load_yaml_dir(os.path.join(DEPLOY, "base", "crds"))]
    crds = crschema.index_crds(crd_docs)
    problems = []
    counts = []
    rendered = {}
    for path in RENDERED:
        docs, warnings = render(a.kubectl, path)
        rendered[path] = docs
        problems += [f"{path}: kustomize: {w}" for w in warnings]
        for v in a.kubernetes_version:
            problems += [f"{path}: Kubernetes {v}: {p}"
                         for p in schema_problems(docs, v, crds,
                                                  custom=v == a.kubernetes_version[0])]
        problems += [f"{path}: {p}" for p in security_problems(docs)]
        counts.append(f"{path}: {len(docs)} objects")
    for name, d in load_yaml_dir(os.path.join(DEPLOY, "examples")):
        crd = crds.get((d["apiVersion"].rpartition("/")[0], d["kind"]))
        if crd is None:
            problems.append(f"examples/{name}: {ident(d)}: no CRD for it")
        else:
            problems += [f"examples/{name}: {m}" for m in crschema.cr_errors(d, crd)]
    problems += self_test(rendered["overlays/cluster-gateway"], a.kubernetes_version[0])

    for c in counts:
        print(c)
    for p in problems:
        print("ERROR", p)
    print(f"deploy check: {sum(len(d) for d in rendered.values())} objects rendered, "
          f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
