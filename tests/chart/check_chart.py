#!/usr/bin/env python3
"""Offline checks of the Deputy Helm chart (charts/deputy), run by scripts/test-chart.

With the real helm binary: `helm lint --strict`, `helm template` of every values file in
tests/chart/valid/ (must render) and tests/chart/invalid/ (must be rejected, with the message
named on its `# expect:` line). Every rendered built-in object is validated against the
official Kubernetes 1.35 OpenAPI schemas (kubernetes-validate, strict: unknown fields are
errors); cert-manager and Prometheus Operator objects against small strict schemas here.
Then the chart's contracts: RBAC equals charts/deputy/rbac-expected.yaml exactly, the pod's
security context, probes, ports, args, services, PDB, NetworkPolicy, ServiceMonitor, and the
ValidatingAdmissionPolicy: its CEL compiles (cel-python), refers only to fields that exist
(CRD schemas, the admission request), and behaves as intended on simulated requests.

Prints only failures, then `N passed, M failed`. Exit status 1 on any failure.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import re
import subprocess
import sys
import traceback

import celpy
import jsonschema
import kubernetes_validate
import yaml
from celpy import celtypes

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CHART = os.path.join(ROOT, "charts", "deputy")
HERE = os.path.dirname(os.path.abspath(__file__))
HELM = os.environ.get("HELM", os.path.join(ROOT, ".tools", "bin", "helm"))
KUBE_VERSION = "1.35.0"
RELEASE = "deputy"
NAMESPACE = "deputy-system"
VERBOSE = os.environ.get("VERBOSE") == "1"

PASSED = 0
FAILED = 0


def check(name: str, ok: bool, detail: str = "") -> bool:
    global PASSED, FAILED
    if ok:
        PASSED += 1
        if VERBOSE:
            print(f"ok   {name}")
    else:
        FAILED += 1
        print(f"FAIL {name}" + (f"\n     {detail}" if detail else ""))
    return ok


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120)


def deep_merge(base, over):
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = deep_merge(base.get(k), v) if k in base else v
        return out
    return over


# --------------------------------------------------------------------------------------------
# Schemas of the non-built-in kinds the chart renders (only the fields cert-manager v1 and
# Prometheus Operator v1 define that a chart would set; unknown fields are errors).
STR = {"type": "string"}
STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": STR, "namespace": STR, "labels": STRMAP, "annotations": STRMAP},
    "additionalProperties": False,
}
ISSUER_REF = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": STR, "kind": {"enum": ["Issuer", "ClusterIssuer"]}, "group": STR},
}
CERT_USAGES = [
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime",
    "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
    "microsoft sgc", "netscape sgc",
]
GO_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}
EXTRA_SCHEMAS = {
    ("cert-manager.io/v1", "Certificate"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": STR, "kind": STR, "metadata": META,
            "spec": {
                "type": "object",
                "required": ["secretName", "issuerRef"],
                "additionalProperties": False,
                "properties": {
                    "secretName": STR, "issuerRef": ISSUER_REF, "commonName": STR,
                    "dnsNames": {"type": "array", "items": STR, "minItems": 1},
                    "ipAddresses": {"type": "array", "items": STR},
                    "uris": {"type": "array", "items": STR},
                    "duration": GO_DURATION, "renewBefore": GO_DURATION, "isCA": {"type": "boolean"},
                    "usages": {"type": "array", "items": {"enum": CERT_USAGES}},
                    "secretTemplate": {"type": "object", "additionalProperties": False,
                                       "properties": {"labels": STRMAP, "annotations": STRMAP}},
                    "privateKey": {
                        "type": "object", "additionalProperties": False,
                        "properties": {
                            "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                            "size": {"type": "integer"},
                            "encoding": {"enum": ["PKCS1", "PKCS8"]},
                            "rotationPolicy": {"enum": ["Never", "Always"]},
                        },
                    },
                },
            },
        },
    },
    ("cert-manager.io/v1", "Issuer"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": STR, "kind": STR, "metadata": META,
            "spec": {
                "type": "object", "additionalProperties": False, "minProperties": 1, "maxProperties": 1,
                "properties": {
                    "selfSigned": {"type": "object", "additionalProperties": False,
                                   "properties": {"crlDistributionPoints": {"type": "array"}}},
                    "ca": {"type": "object", "required": ["secretName"], "additionalProperties": False,
                           "properties": {"secretName": STR}},
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": STR, "kind": STR, "metadata": META,
            "spec": {
                "type": "object", "required": ["selector"], "additionalProperties": False,
                "properties": {
                    "selector": {"type": "object", "additionalProperties": False,
                                 "properties": {"matchLabels": STRMAP, "matchExpressions": {"type": "array"}}},
                    "namespaceSelector": {"type": "object", "additionalProperties": False,
                                          "properties": {"any": {"type": "boolean"},
                                                         "matchNames": {"type": "array", "items": STR}}},
                    "jobLabel": STR,
                    "endpoints": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "additionalProperties": False,
                        "properties": {
                            "port": STR, "targetPort": {"type": ["string", "integer"]}, "path": STR,
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "honorLabels": {"type": "boolean"},
                        },
                    }},
                },
            },
        },
    },
}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy",
                  "ValidatingAdmissionPolicyBinding", "CustomResourceDefinition"}
REQUIRED_LABELS = ["app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                   "app.kubernetes.io/managed-by", "app.kubernetes.io/component", "helm.sh/chart"]


# --------------------------------------------------------------------------------------------
# CRDs
def load_crds() -> dict:
    crds = {}
    for path in sorted(glob.glob(os.path.join(CHART, "crds", "*.yaml"))):
        name = os.path.relpath(path, ROOT)
        try:
            docs = [d for d in yaml.safe_load_all(open(path)) if d]
        except yaml.YAMLError as e:
            check(f"{name}: parses as YAML", False, str(e))
            continue
        check(f"{name}: parses as YAML", True)
        for d in docs:
            ok = d.get("apiVersion") == "apiextensions.k8s.io/v1" and d.get("kind") == "CustomResourceDefinition"
            check(f"{name}: is an apiextensions.k8s.io/v1 CustomResourceDefinition", ok,
                  f"{d.get('apiVersion')} {d.get('kind')}")
            if not ok:
                continue
            try:
                kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
                check(f"{name}: valid against the Kubernetes {KUBE_VERSION} schema", True)
            except Exception as e:  # noqa: BLE001
                check(f"{name}: valid against the Kubernetes {KUBE_VERSION} schema", False, str(e)[:500])
            # ResourceServers are cluster-scoped: only administrators register audiences.
            scope = "Cluster" if d["spec"]["names"]["kind"] == "ResourceServer" else "Namespaced"
            check(f"{name}: group deputy.dev, {scope}", d["spec"]["group"] == "deputy.dev"
                  and d["spec"]["scope"] == scope)
            crds[d["spec"]["names"]["kind"]] = d
    check("crds: ResourceServer, Agent, DelegationGrant and AgentRun present",
          {"ResourceServer", "Agent", "DelegationGrant", "AgentRun"} <= set(crds), str(sorted(crds)))
    return crds


def crd_schema(crd: dict) -> dict:
    versions = crd["spec"]["versions"]
    served = [v for v in versions if v.get("storage")] or versions
    return served[0]["schema"]["openAPIV3Schema"]


def openapi_to_jsonschema(s):
    """Structural OpenAPI v3 -> JSON Schema, with unknown fields rejected (as the API server
    prunes/rejects them) except where x-kubernetes-preserve-unknown-fields says otherwise."""
    if isinstance(s, list):
        return [openapi_to_jsonschema(x) for x in s]
    if not isinstance(s, dict):
        return s
    out = {}
    for k, v in s.items():
        if k.startswith("x-kubernetes-") or k == "nullable":
            continue
        if k in ("properties", "patternProperties"):
            out[k] = {pk: openapi_to_jsonschema(pv) for pk, pv in v.items()}
        elif k in ("items", "additionalProperties", "not") and isinstance(v, dict):
            out[k] = openapi_to_jsonschema(v)
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = openapi_to_jsonschema(v)
        else:
            out[k] = v
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in s and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


# --------------------------------------------------------------------------------------------
# RBAC
def load_expected_rbac() -> list:
    path = os.path.join(CHART, "rbac-expected.yaml")
    data = yaml.safe_load(open(path))
    ok = isinstance(data, list) and all(
        isinstance(e, dict) and set(e) <= {"apiGroup", "resource", "verbs", "scope", "resourceNames"}
        and {"apiGroup", "resource", "verbs", "scope"} <= set(e) and e["scope"] in ("cluster", "namespace")
        and isinstance(e["verbs"], list) and e["verbs"]
        for e in data)
    check("rbac-expected.yaml: a list of {apiGroup, resource, verbs, scope[, resourceNames]}", ok)
    for e in data:
        if e.get("resourceNames"):
            check(f"rbac-expected.yaml: {e['resource']} with resourceNames does not include create/list/watch",
                  not ({"create", "list", "watch", "deletecollection"} & set(e["verbs"])),
                  "RBAC cannot restrict these verbs by name")
    return data


def rbac_table(rules: list) -> dict:
    """(apiGroup, resource, resourceNames) -> set of verbs; refuses wildcards."""
    table: dict = {}
    for r in rules:
        names = tuple(sorted(r.get("resourceNames") or []))
        for g in r.get("apiGroups", []):
            for res in r.get("resources", []):
                table.setdefault((g, res, names), set()).update(r.get("verbs", []))
        if r.get("nonResourceURLs"):
            table.setdefault(("nonResourceURLs", ",".join(r["nonResourceURLs"]), ()), set()).update(r["verbs"])
    return table


def expected_table(expected: list, scope: str, lease: str, keys: str) -> dict:
    subst = {"deputy-controller": lease, "deputy-signing-keys": keys}
    table: dict = {}
    for e in expected:
        if e["scope"] != scope:
            continue
        names = tuple(sorted(subst.get(n, n) for n in e.get("resourceNames") or []))
        table.setdefault((e["apiGroup"], e["resource"], names), set()).update(e["verbs"])
    return table


def fmt_table(t: dict) -> str:
    return "; ".join(f"{g or 'core'}/{r}{list(n) if n else ''}: {sorted(v)}" for (g, r, n), v in sorted(t.items()))


# --------------------------------------------------------------------------------------------
# CEL
CEL_ENV = celpy.Environment()
REQUEST_FIELDS = {
    "uid": None, "kind": {"group", "version", "kind"}, "resource": {"group", "version", "resource"},
    "subResource": None, "requestKind": {"group", "version", "kind"},
    "requestResource": {"group", "version", "resource"}, "requestSubResource": None, "name": None,
    "namespace": None, "operation": None, "userInfo": {"username", "uid", "groups", "extra"},
    "dryRun": None, "options": None,
}
META_FIELDS = {"name", "namespace", "labels", "annotations", "uid", "generation", "finalizers",
               "ownerReferences", "creationTimestamp", "deletionTimestamp", "generateName", "resourceVersion"}
VAP_ROOTS = {"object", "oldObject", "request", "params", "namespaceObject", "authorizer", "variables"}
CEL_FUNCS = {"has", "size", "matches", "startsWith", "endsWith", "contains", "all", "exists", "exists_one",
             "map", "filter", "string", "int", "uint", "double", "bool", "type", "duration", "timestamp",
             "dyn", "bytes", "lowerAscii", "upperAscii", "split", "join", "trim", "replace", "indexOf",
             "url", "ip", "cidr", "isSorted", "sum", "min", "max", "quantity", "format"}


def cel_refs(tree) -> tuple[set, set]:
    """Returns (dotted paths rooted at an identifier, free identifiers) used by a parsed CEL
    expression (lark tree from cel-python)."""
    from lark import Token, Tree

    paths: set = set()
    idents: set = set()

    def chain(node):
        # member_dot: [member, IDENT]; member: [primary|member_dot|member_dot_arg|...]
        if isinstance(node, Tree):
            if node.data == "member_dot":
                base = chain(node.children[0])
                return base + [str(node.children[1])] if base is not None else None
            if node.data in ("member", "primary") and len(node.children) == 1:
                return chain(node.children[0])
            if node.data == "ident":
                return [str(node.children[0])]
        return None

    def walk(node):
        if isinstance(node, Tree):
            if node.data == "member_dot":
                c = chain(node)
                if c:
                    paths.add(".".join(c))
            if node.data == "ident":
                idents.add(str(node.children[0]))
            if node.data == "ident_arg":
                pass  # a global function call: name is children[0]
            for ch in node.children:
                walk(ch)
        elif isinstance(node, Token):
            pass

    walk(tree)
    return paths, idents


def schema_has_path(schema: dict, parts: list) -> bool:
    s = schema
    for p in parts:
        props = s.get("properties") or {}
        if p in props:
            s = props[p]
        elif isinstance(s.get("additionalProperties"), dict):
            s = s["additionalProperties"]
        elif s.get("x-kubernetes-preserve-unknown-fields"):
            return True
        else:
            return False
    return True


def check_cel_refs(label: str, expr: str, crds: dict, variables_before: list, kinds: list, where: str) -> None:
    try:
        tree = CEL_ENV.compile(expr)
    except Exception as e:  # noqa: BLE001
        check(f"{label}: CEL compiles: {expr!r}", False, str(e)[:300])
        return
    check(f"{label}: CEL compiles", True)
    paths, idents = cel_refs(tree)
    # Variables bound by a comprehension macro (`list.filter(f, …)`, `map.map(k, …)`).
    bound = set(re.findall(r"\.(?:filter|map|all|exists|exists_one)\(\s*([A-Za-z_]\w*)\s*,", expr))
    bad = sorted(i for i in idents if i not in VAP_ROOTS and i not in CEL_FUNCS and i not in bound)
    check(f"{label}: uses only the admission variables", not bad, f"unknown identifiers {bad} in {expr!r}")
    if where == "messageExpression":
        check(f"{label}: no authorizer in a messageExpression", "authorizer" not in idents, expr)
    problems = []
    for path in sorted(paths):
        parts = path.split(".")
        root, rest = parts[0], parts[1:]
        if root in ("object", "oldObject") and rest:
            if rest[0] == "metadata":
                if len(rest) > 1 and rest[1] not in META_FIELDS:
                    problems.append(path)
            else:
                for kind in kinds:
                    if not schema_has_path(crd_schema(crds[kind]), rest):
                        problems.append(f"{path} (not in the {kind} CRD schema)")
        elif root == "request" and rest:
            if rest[0] not in REQUEST_FIELDS:
                problems.append(f"{path} (not an admission request field)")
            elif len(rest) > 1 and (REQUEST_FIELDS[rest[0]] is None or rest[1] not in REQUEST_FIELDS[rest[0]]) \
                    and rest[0] != "options":
                problems.append(f"{path} (not an admission request field)")
        elif root == "variables" and rest:
            if rest[0] not in variables_before:
                problems.append(f"{path} (not a variable defined before this expression)")
    check(f"{label}: every object/request/variables field it reads exists", not problems, "; ".join(problems))


def cel_eval(expr: str, activation: dict):
    funcs = {
        "group": lambda t, g: celtypes.MapType({celtypes.StringType("group"): g}),
        "resource": lambda t, r: celtypes.MapType({**t, celtypes.StringType("resource"): r}),
        "name": lambda t, n: celtypes.MapType({**t, celtypes.StringType("name"): n}),
        "namespace": lambda t, n: celtypes.MapType({**t, celtypes.StringType("namespace"): n}),
        "check": lambda t, v: celtypes.MapType({**t, celtypes.StringType("verb"): v}),
        "allowed": lambda t: celtypes.BoolType(activation["_authz"](
            {str(k): str(v) for k, v in t.items()})),
    }
    prog = CEL_ENV.program(CEL_ENV.compile(expr), functions=funcs)
    act = {k: v for k, v in activation.items() if not k.startswith("_")}
    return prog.evaluate(act)


def simulate_vap(vap: dict, *, user: str, op: str, resource: str, obj: dict, old: dict | None,
                 can_act_for: set, subresource: str = "") -> tuple[str, str]:
    """Evaluates the policy as the API server would. Returns (outcome, message), outcome in
    skip | allow | deny."""
    spec = vap["spec"]
    matched = any(
        "deputy.dev" in r["apiGroups"] and op in r["operations"]
        and (resource + (f"/{subresource}" if subresource else "")) in r["resources"]
        for r in spec["matchConstraints"]["resourceRules"])
    if not matched:
        return "skip", ""

    def authz(attrs: dict) -> bool:
        # RBAC as the test case says: the user may act-for exactly the principals in can_act_for.
        return (attrs.get("group") == "deputy.dev" and attrs.get("resource") == "principals"
                and attrs.get("verb") == "act-for" and attrs.get("name") in can_act_for)

    meta = (obj if obj is not None else old)["metadata"]
    act = {
        "object": celpy.json_to_cel(obj) if obj is not None else None,
        "oldObject": celpy.json_to_cel(old) if old is not None else None,
        "request": celpy.json_to_cel({"operation": op, "userInfo": {"username": user, "groups": ["system:authenticated"]},
                                      "subResource": subresource, "namespace": meta.get("namespace", ""),
                                      "name": meta["name"],
                                      "resource": {"group": "deputy.dev", "version": "v1alpha1", "resource": resource}}),
        "authorizer": celpy.json_to_cel({}),
        "_authz": authz,
    }
    for mc in spec.get("matchConditions", []):
        if cel_eval(mc["expression"], act) is not True and cel_eval(mc["expression"], act) != celtypes.BoolType(True):
            return "skip", mc["name"]
    variables = {}
    for v in spec.get("variables", []):
        act["variables"] = celpy.json_to_cel({})
        act["variables"] = celtypes.MapType({celtypes.StringType(k): val for k, val in variables.items()})
        variables[v["name"]] = cel_eval(v["expression"], act)
    act["variables"] = celtypes.MapType({celtypes.StringType(k): val for k, val in variables.items()})
    for val in spec["validations"]:
        result = cel_eval(val["expression"], act)
        if result != celtypes.BoolType(True):
            msg = val.get("message", "")
            if val.get("messageExpression"):
                msg = str(cel_eval(val["messageExpression"], act))
            return "deny", msg
    return "allow", ""


def check_vap(label: str, docs: list, values: dict, crds: dict, sa_user: str) -> None:
    all_vaps = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    all_bindings = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    a = values["admission"]
    if not a["enabled"]:
        check(f"{label}: admission.enabled=false renders no policy", not all_vaps and not all_bindings)
        return
    check(f"{label}: two ValidatingAdmissionPolicies (principal, status), each with a binding",
          len(all_vaps) == 2 and len(all_bindings) == 2)
    # The status policy: only Deputy's ServiceAccount writes the status of the three kinds.
    status_vaps = [d for d in all_vaps if d["metadata"]["name"].endswith("-status")]
    if check(f"{label}: a status policy", len(status_vaps) == 1):
        sp = status_vaps[0]["spec"]
        res = sorted(r for rule in sp["matchConstraints"]["resourceRules"] for r in rule["resources"])
        check(f"{label}: status policy matches the three status subresources",
              res == ["agentruns/status", "agents/status", "delegationgrants/status"], str(res))
        check(f"{label}: status policy allows only Deputy's ServiceAccount",
              any(sa_user in v["expression"] for v in sp["validations"]))
        check(f"{label}: status policy is bound", any(b["spec"]["policyName"] == status_vaps[0]["metadata"]["name"]
                                                       for b in all_bindings))
    vaps = [d for d in all_vaps if d["metadata"]["name"].endswith("-principal")]
    bindings = [d for d in all_bindings if vaps and d["spec"]["policyName"] == vaps[0]["metadata"]["name"]]
    if not check(f"{label}: one principal policy and its binding", len(vaps) == 1 and len(bindings) == 1):
        return
    vap, binding = vaps[0], bindings[0]
    spec = vap["spec"]
    check(f"{label}: VAP apiVersion admissionregistration.k8s.io/v1",
          vap["apiVersion"] == "admissionregistration.k8s.io/v1" and binding["apiVersion"] == vap["apiVersion"])
    check(f"{label}: binding names the policy", binding["spec"]["policyName"] == vap["metadata"]["name"])
    check(f"{label}: binding validationActions", binding["spec"]["validationActions"] == a["validationActions"])
    check(f"{label}: failurePolicy", spec.get("failurePolicy") == a["failurePolicy"])
    rules = spec["matchConstraints"]["resourceRules"]
    res = sorted(r for rule in rules for r in rule["resources"])
    ops = sorted({o for rule in rules for o in rule["operations"]})
    by_res = {r: sorted(rule["operations"]) for rule in rules for r in rule["resources"]}
    check(f"{label}: VAP matches agentruns and delegationgrants (CREATE, UPDATE, DELETE), main resources only",
          by_res == {"agentruns": ["CREATE", "DELETE", "UPDATE"], "delegationgrants": ["CREATE", "DELETE", "UPDATE"]}
          and all(rule["apiGroups"] == ["deputy.dev"] for rule in rules), f"{by_res}")
    kinds = ["AgentRun", "DelegationGrant"]
    for kind in kinds:
        check(f"{label}: {kind} CRD has spec.principal (required)",
              "principal" in crd_schema(crds[kind])["properties"]["spec"]["properties"]
              and "principal" in crd_schema(crds[kind])["properties"]["spec"].get("required", []))

    names = []
    for mc in spec.get("matchConditions", []):
        check_cel_refs(f"{label}: matchCondition {mc['name']}", mc["expression"], crds, [], kinds, "matchCondition")
    for v in spec.get("variables", []):
        check_cel_refs(f"{label}: variable {v['name']}", v["expression"], crds, list(names), kinds, "variable")
        names.append(v["name"])
    for i, val in enumerate(spec["validations"]):
        check_cel_refs(f"{label}: validation {i}", val["expression"], crds, names, kinds, "expression")
        if val.get("messageExpression"):
            check_cel_refs(f"{label}: validation {i} messageExpression", val["messageExpression"], crds, names,
                           kinds, "messageExpression")
        check(f"{label}: validation {i} has a message", bool(val.get("message")))
    for aa in spec.get("auditAnnotations", []):
        check_cel_refs(f"{label}: auditAnnotation {aa['key']}", aa["valueExpression"], crds, names, kinds,
                       "auditAnnotation")
    all_cel = json.dumps(spec)
    check(f"{label}: the policy does not pretend to check that parentRun exists", "parentRun" not in all_cel)

    # Behaviour on simulated requests.
    def run(principal, **spec_extra):
        return {"apiVersion": "deputy.dev/v1alpha1", "kind": "AgentRun",
                "metadata": {"name": "r1", "namespace": "marketing", "finalizers": []},
                "spec": {"agent": "gdpr", "principal": principal, "scopes": ["a:b"], **spec_extra}}

    def grant(principal, scopes):
        return {"apiVersion": "deputy.dev/v1alpha1", "kind": "DelegationGrant",
                "metadata": {"name": "g1", "namespace": "marketing"},
                "spec": {"agent": "gdpr", "principal": principal, "effect": "Allow", "scopes": scopes}}

    imp = a["actForCheck"]
    alices_grant = grant("alice@example.com", ["x:*"])
    with_revoke = copy.deepcopy(run("alice@example.com"))
    with_revoke["metadata"]["annotations"] = {"deputy.dev/revoke-requested": "2026-11-23T12:00:00Z"}
    with_gc_fin = copy.deepcopy(run("alice@example.com"))
    with_gc_fin["metadata"]["finalizers"] = ["foregroundDeletion"]
    exempt = a["exemptController"]
    with_fin = copy.deepcopy(run("alice@example.com"))
    with_fin["metadata"]["finalizers"] = ["deputy.dev/cleanup"]
    with_ann = copy.deepcopy(run("alice@example.com"))
    with_ann["metadata"]["annotations"] = {"deputy.dev/revoke": "true"}
    with_owner = copy.deepcopy(run("alice@example.com"))
    with_owner["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "bobs",
                                                  "uid": "0b0b0b0b-0000-0000-0000-000000000000"}]
    alices_run = run("alice@example.com")
    ns_controller = "system:serviceaccount:kube-system:namespace-controller"
    gc = "system:serviceaccount:kube-system:generic-garbage-collector"
    lifecycle = set(a.get("lifecycleControllers") or [])
    cases = [
        ("alice creates a run for herself", dict(user="alice@example.com", op="CREATE", resource="agentruns",
                                                 obj=run("alice@example.com"), old=None, can_act_for=set()), "allow"),
        ("bob creates a run for alice", dict(user="bob@example.com", op="CREATE", resource="agentruns",
                                             obj=run("alice@example.com"), old=None, can_act_for=set()), "deny"),
        ("bob creates a grant for alice", dict(user="bob@example.com", op="CREATE", resource="delegationgrants",
                                               obj=grant("alice@example.com", ["x:*"]), old=None, can_act_for=set()),
         "deny"),
        ("alice creates her grant", dict(user="alice@example.com", op="CREATE", resource="delegationgrants",
                                         obj=grant("alice@example.com", ["x:*"]), old=None, can_act_for=set()),
         "allow"),
        ("an orchestrator allowed to act-for alice creates a run for her",
         dict(user="system:serviceaccount:ops:orchestrator", op="CREATE", resource="agentruns",
              obj=run("alice@example.com"), old=None, can_act_for={"alice@example.com"}),
         "allow" if imp else "deny"),
        ("an orchestrator allowed to act-for carol creates a run for alice",
         dict(user="system:serviceaccount:ops:orchestrator", op="CREATE", resource="agentruns",
              obj=run("alice@example.com"), old=None, can_act_for={"carol@example.com"}), "deny"),
        ("bob widens alice's grant (UPDATE of spec)",
         dict(user="bob@example.com", op="UPDATE", resource="delegationgrants",
              obj=grant("alice@example.com", ["x:*", "y:*"]), old=grant("alice@example.com", ["x:*"]),
              can_act_for=set()), "deny"),
        ("alice updates her own run's spec",
         dict(user="alice@example.com", op="UPDATE", resource="agentruns",
              obj=run("alice@example.com", task="t2"), old=run("alice@example.com"), can_act_for=set()), "allow"),
        ("Deputy adds its finalizer (JSON patch, spec unchanged)",
         dict(user=sa_user, op="UPDATE", resource="agentruns", obj=with_fin, old=run("alice@example.com"),
              can_act_for=set()), "skip"),
        ("Deputy sets the self-revocation annotation (merge patch, spec unchanged)",
         dict(user=sa_user, op="UPDATE", resource="agentruns", obj=with_ann, old=run("alice@example.com"),
              can_act_for=set()), "skip"),
        ("Deputy patches a run's status (/status)",
         dict(user=sa_user, op="UPDATE", resource="agentruns", subresource="status", obj=run("alice@example.com"),
              old=run("alice@example.com"), can_act_for=set()), "skip"),
        ("the garbage collector removes its own finalizer of alice's run",
         dict(user="system:serviceaccount:kube-system:generic-garbage-collector", op="UPDATE", resource="agentruns",
              obj=run("alice@example.com"), old=with_gc_fin, can_act_for=set()), "skip"),
        ("bob removes Deputy's finalizer from alice's run",
         dict(user="bob@example.com", op="UPDATE", resource="agentruns",
              obj=run("alice@example.com"), old=with_fin, can_act_for=set()), "deny"),
        ("bob revokes alice's run with the annotation",
         dict(user="bob@example.com", op="UPDATE", resource="agentruns",
              obj=with_revoke, old=run("alice@example.com"), can_act_for=set()), "deny"),
        ("alice revokes her own run with the annotation",
         dict(user="alice@example.com", op="UPDATE", resource="agentruns",
              obj=with_revoke, old=run("alice@example.com"), can_act_for=set()), "allow"),
        ("bob deletes alice's grant (her Deny, say)",
         dict(user="bob@example.com", op="DELETE", resource="delegationgrants",
              obj=None, old=alices_grant, can_act_for=set()), "deny"),
        ("alice deletes her grant",
         dict(user="alice@example.com", op="DELETE", resource="delegationgrants",
              obj=None, old=alices_grant, can_act_for=set()), "allow"),
        ("an orchestrator allowed to act-for alice deletes her grant",
         dict(user="system:serviceaccount:ops:orchestrator", op="DELETE", resource="delegationgrants",
              obj=None, old=alices_grant, can_act_for={"alice@example.com"}), "allow" if imp else "deny"),
        ("bob deletes alice's run",
         dict(user="bob@example.com", op="DELETE", resource="agentruns", obj=None, old=alices_run,
              can_act_for=set()), "deny"),
        ("alice deletes her run",
         dict(user="alice@example.com", op="DELETE", resource="agentruns", obj=None, old=alices_run,
              can_act_for=set()), "allow"),
        ("an orchestrator allowed to act-for alice deletes her run",
         dict(user="system:serviceaccount:ops:orchestrator", op="DELETE", resource="agentruns",
              obj=None, old=alices_run, can_act_for={"alice@example.com"}), "allow" if imp else "deny"),
        ("the namespace controller deletes alice's grant (her namespace is going)",
         dict(user=ns_controller, op="DELETE", resource="delegationgrants", obj=None, old=alices_grant,
              can_act_for=set()), "skip" if ns_controller in lifecycle else "deny"),
        ("the garbage collector deletes alice's run (its owner went)",
         dict(user=gc, op="DELETE", resource="agentruns", obj=None, old=alices_run,
              can_act_for=set()), "skip" if gc in lifecycle else "deny"),
        ("bob makes alice's run a dependent of his object (the GC would delete it)",
         dict(user="bob@example.com", op="UPDATE", resource="agentruns", obj=with_owner, old=alices_run,
              can_act_for=set()), "deny"),
        ("the garbage collector orphans alice's run (removes an owner reference)",
         dict(user=gc, op="UPDATE", resource="agentruns", obj=alices_run, old=with_owner,
              can_act_for=set()), "skip" if gc in lifecycle else "deny"),
        ("Deputy's ServiceAccount changes a run's spec",
         dict(user=sa_user, op="UPDATE", resource="agentruns", obj=run("alice@example.com", task="t2"),
              old=run("alice@example.com"), can_act_for=set()), "skip" if exempt else "deny"),
    ]
    for name, kw, want in cases:
        try:
            got, msg = simulate_vap(vap, **kw)
        except Exception as e:  # noqa: BLE001
            check(f"{label}: policy: {name} -> {want}", False, f"evaluation error: {e!r}")
            continue
        detail = f"got {got} {msg!r}"
        ok = got == want
        if ok and got == "deny":
            ok = "alice@example.com" in msg and kw["user"] in msg
            detail += " (the message must name the principal and the user)"
        check(f"{label}: policy: {name} -> {want}", ok, detail)


# --------------------------------------------------------------------------------------------
# One rendered values case
def check_render(label: str, values_file: str, crds: dict, expected_rbac: list) -> None:
    defaults = yaml.safe_load(open(os.path.join(CHART, "values.yaml")))
    override = yaml.safe_load(open(values_file)) or {}
    v = deep_merge(defaults, override)

    lint = helm("lint", "--strict", CHART, "-f", values_file, "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION)
    check(f"{label}: helm lint --strict", lint.returncode == 0 and "[WARNING]" not in lint.stdout + lint.stderr,
          (lint.stdout + lint.stderr)[-1500:])
    r = helm("template", RELEASE, CHART, "-f", values_file, "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION)
    if not check(f"{label}: helm template renders", r.returncode == 0, r.stderr[-1500:]):
        return
    try:
        docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    except yaml.YAMLError as e:
        check(f"{label}: rendered YAML parses", False, str(e))
        return
    check(f"{label}: rendered YAML parses", True)

    fullname = v["fullnameOverride"] or (RELEASE if "deputy" in RELEASE else f"{RELEASE}-deputy")
    sa = v["serviceAccount"]["name"] or fullname
    sa_user = f"system:serviceaccount:{NAMESPACE}:{sa}"
    keys = v["signingKeys"]["existingSecret"] or v["signingKeys"]["secretName"]
    lease = v["leaderElection"]["leaseName"]
    tls = v["tls"]["enabled"]
    replicas = v["replicaCount"]

    # Schemas and metadata of every object.
    seen = set()
    for d in docs:
        kind, api = d.get("kind"), d.get("apiVersion")
        ident = f"{kind}/{d.get('metadata', {}).get('name')}"
        check(f"{label}: {ident} is unique", (api, kind, d["metadata"].get("name")) not in seen)
        seen.add((api, kind, d["metadata"].get("name")))
        if (api, kind) in EXTRA_SCHEMAS:
            errs = sorted(jsonschema.Draft7Validator(EXTRA_SCHEMAS[(api, kind)]).iter_errors(d), key=str)
            check(f"{label}: {ident} valid ({api} schema)", not errs,
                  "; ".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errs)[:800])
        else:
            try:
                kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
                check(f"{label}: {ident} valid against the Kubernetes {KUBE_VERSION} schema (strict)", True)
            except kubernetes_validate.SchemaNotFoundError:
                check(f"{label}: {ident}: a kind the chart may render", False, f"{api} {kind} is unknown")
            except Exception as e:  # noqa: BLE001
                check(f"{label}: {ident} valid against the Kubernetes {KUBE_VERSION} schema (strict)", False,
                      str(e)[:800])
        labels = d["metadata"].get("labels") or {}
        missing = [l for l in REQUIRED_LABELS if l not in labels]
        check(f"{label}: {ident} carries the standard labels", not missing, f"missing {missing}")
        if kind in CLUSTER_SCOPED:
            check(f"{label}: {ident} is cluster-scoped (no namespace)", "namespace" not in d["metadata"])
        else:
            check(f"{label}: {ident} is in the release namespace", d["metadata"].get("namespace") == NAMESPACE)

    by_kind: dict = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    # RBAC.
    all_crs = by_kind.get("ClusterRole", [])
    user_roles = [c for c in all_crs if "deputy.dev/user-role" in (c["metadata"].get("labels") or {})]
    if v.get("userRoles", {}).get("create", True):
        names = sorted(c["metadata"]["labels"]["deputy.dev/user-role"] for c in user_roles)
        check(f"{label}: user ClusterRoles principal, orchestrator, platform and introspector",
              names == ["introspector", "orchestrator", "platform", "principal"], str(names))
        for c in user_roles:
            role = c["metadata"]["labels"]["deputy.dev/user-role"]
            res = [r for rule in c["rules"] for r in rule.get("resources", [])]
            verbs = [vb for rule in c["rules"] for vb in rule.get("verbs", [])]
            check(f"{label}: user role {role} grants no status, finalizers or act-for",
                  not any("/" in r or r == "principals" for r in res) and "act-for" not in verbs
                  and "impersonate" not in verbs, str(c["rules"]))
            check(f"{label}: user role {role} has no wildcard",
                  not any("*" in rule.get("verbs", []) + rule.get("resources", []) + rule.get("apiGroups", [])
                          for rule in c["rules"]))
            writes = {r for rule in c["rules"] for r in rule.get("resources", [])
                      if set(rule.get("verbs", [])) & {"create", "update", "patch"}}
            want = {"principal": {"agentruns", "delegationgrants"}, "orchestrator": {"agentruns"},
                    "platform": {"agents", "resourceservers"}, "introspector": {"introspections"}}[role]
            check(f"{label}: user role {role} writes exactly {sorted(want)}", writes == want, str(sorted(writes)))
    else:
        check(f"{label}: userRoles.create=false renders no user roles", not user_roles)
    if v["rbac"]["create"]:
        crs, rs = [c for c in all_crs if c not in user_roles], by_kind.get("Role", [])
        if check(f"{label}: one ClusterRole and one Role", len(crs) == 1 and len(rs) == 1):
            got, want = rbac_table(crs[0]["rules"]), expected_table(expected_rbac, "cluster", lease, keys)
            check(f"{label}: ClusterRole grants exactly rbac-expected.yaml (scope: cluster)", got == want,
                  f"\n       rendered: {fmt_table(got)}\n       expected: {fmt_table(want)}")
            got, want = rbac_table(rs[0]["rules"]), expected_table(expected_rbac, "namespace", lease, keys)
            check(f"{label}: Role grants exactly rbac-expected.yaml (scope: namespace)", got == want,
                  f"\n       rendered: {fmt_table(got)}\n       expected: {fmt_table(want)}")
            wild = [r for r in crs[0]["rules"] + rs[0]["rules"]
                    if "*" in r.get("verbs", []) + r.get("resources", []) + r.get("apiGroups", [])]
            check(f"{label}: no wildcard in RBAC", not wild, str(wild))
            for b in by_kind.get("ClusterRoleBinding", []) + by_kind.get("RoleBinding", []):
                check(f"{label}: {b['kind']} binds the operator ServiceAccount",
                      b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
                      and b["roleRef"]["name"] == fullname)
    else:
        check(f"{label}: rbac.create=false renders no RBAC for Deputy", not any(
            k in by_kind for k in ("Role", "ClusterRoleBinding", "RoleBinding"))
            and all(c in user_roles for c in all_crs))
    sas = by_kind.get("ServiceAccount", [])
    if v["serviceAccount"]["create"]:
        check(f"{label}: ServiceAccount {sa} rendered", [s["metadata"]["name"] for s in sas] == [sa])
    else:
        check(f"{label}: serviceAccount.create=false renders none", not sas)

    # Deployment.
    deps = by_kind.get("Deployment", [])
    if not check(f"{label}: one Deployment", len(deps) == 1):
        return
    dep = deps[0]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    check(f"{label}: replicas = replicaCount", dep["spec"]["replicas"] == replicas)
    check(f"{label}: selector matches the pod labels", all(
        dep["spec"]["template"]["metadata"]["labels"].get(k) == val
        for k, val in dep["spec"]["selector"]["matchLabels"].items()))
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    check(f"{label}: pod runs as non-root 65532:65532", psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 65532
          and psc.get("runAsGroup") == 65532, str(psc))
    check(f"{label}: seccomp RuntimeDefault (pod and container)",
          psc.get("seccompProfile") == {"type": "RuntimeDefault"} and csc.get("seccompProfile") == {"type": "RuntimeDefault"})
    check(f"{label}: container runAsNonRoot, readOnlyRootFilesystem, no privilege escalation",
          csc.get("runAsNonRoot") is True and csc.get("readOnlyRootFilesystem") is True
          and csc.get("allowPrivilegeEscalation") is False and csc.get("privileged") is not True, str(csc))
    check(f"{label}: capabilities drop ALL, add none",
          csc.get("capabilities", {}).get("drop") == ["ALL"] and not csc.get("capabilities", {}).get("add"))
    check(f"{label}: automountServiceAccountToken true", pod.get("automountServiceAccountToken") is True)
    check(f"{label}: serviceAccountName", pod.get("serviceAccountName") == sa)
    check(f"{label}: terminationGracePeriodSeconds 30", pod.get("terminationGracePeriodSeconds") == 30)
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    tport = "https" if tls else "http"
    check(f"{label}: ports admin:9090 and {tport}:8443", ports == {"admin": 9090, tport: 8443}, str(ports))
    lp, rp = c.get("livenessProbe", {}).get("httpGet", {}), c.get("readinessProbe", {}).get("httpGet", {})
    check(f"{label}: liveness probe GET /livez on admin", lp.get("path") == "/livez" and lp.get("port") in ("admin", 9090), str(lp))
    check(f"{label}: readiness probe GET /readyz on admin", rp.get("path") == "/readyz" and rp.get("port") in ("admin", 9090), str(rp))
    if override.get("resources") is None:
        check(f"{label}: default resources 50m/64Mi requests, 500m/256Mi limits", c.get("resources") == {
            "requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}}, str(c.get("resources")))
    env = {e["name"]: e for e in c.get("env", [])}
    check(f"{label}: env POD_NAMESPACE and POD_NAME from the downward API",
          env.get("POD_NAMESPACE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace"
          and env.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name")
    args = c.get("args", [])
    check(f"{label}: args start with `run`", args[:1] == ["run"], str(args))
    flags = {}
    for a in args[1:]:
        m = re.match(r"^--([a-z-]+)=(.*)$", a)
        if not check(f"{label}: arg {a!r} is --flag=value", bool(m)):
            continue
        flags[m.group(1)] = m.group(2)
    known = {"issuer", "token-endpoint", "trust-domain", "namespace", "keys-secret", "signing-alg", "key-rotation",
             "max-token-ttl", "default-token-ttl", "max-run-duration", "listen", "admin-listen", "tls-cert",
             "tls-key", "log-format", "leader-election-lease", "leader-election-lease-duration",
             "max-concurrent-reconciles"}
    check(f"{label}: only known `deputy run` flags", set(flags) <= known, str(sorted(set(flags) - known)))
    issuer = v["config"]["issuer"] or f"{'https' if tls else 'http'}://{fullname}.{NAMESPACE}.svc"
    check(f"{label}: --issuer {issuer}", flags.get("issuer") == issuer, str(flags.get("issuer")))
    check(f"{label}: issuer scheme matches tls.enabled", tls == flags.get("issuer", "").startswith("https://")
          or bool(v["config"]["issuer"]))
    check(f"{label}: --keys-secret {keys}", flags.get("keys-secret") == keys)
    check(f"{label}: --signing-alg / --key-rotation", flags.get("signing-alg") == v["signingKeys"]["algorithm"]
          and flags.get("key-rotation") == v["signingKeys"]["rotationInterval"])
    check(f"{label}: --leader-election-lease {lease}", flags.get("leader-election-lease") == lease)
    check(f"{label}: --leader-election-lease-duration {v['leaderElection']['leaseDuration']}",
          flags.get("leader-election-lease-duration") == v["leaderElection"]["leaseDuration"])
    check(f"{label}: --max-concurrent-reconciles {v['config']['maxConcurrentReconciles']}",
          flags.get("max-concurrent-reconciles") == str(v["config"]["maxConcurrentReconciles"]))
    check(f"{label}: --listen 8443, --admin-listen 9090",
          flags.get("listen") == "0.0.0.0:8443" and flags.get("admin-listen") == "0.0.0.0:9090")
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    vols = {vv["name"]: vv for vv in pod.get("volumes", [])}
    if tls:
        secret = v["tls"]["existingSecret"] or f"{fullname}-tls"
        check(f"{label}: --tls-cert/--tls-key in the mounted TLS Secret {secret}",
              flags.get("tls-cert") == "/etc/deputy/tls/tls.crt" and flags.get("tls-key") == "/etc/deputy/tls/tls.key"
              and mounts.get("tls", {}).get("mountPath") == "/etc/deputy/tls" and "subPath" not in mounts.get("tls", {})
              and vols.get("tls", {}).get("secret", {}).get("secretName") == secret)
    else:
        check(f"{label}: no TLS flags or volume when tls.enabled=false",
              "tls-cert" not in flags and "tls-key" not in flags and "tls" not in vols)
    spread = pod.get("topologySpreadConstraints", [])
    check(f"{label}: topology spread constraints select the operator pods",
          len(spread) == len(v["topologySpreadConstraints"]) and all(
              s["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"] for s in spread))
    anti = pod.get("affinity", {}).get("podAntiAffinity", {})
    want_anti = {"soft": "preferredDuringSchedulingIgnoredDuringExecution",
                 "hard": "requiredDuringSchedulingIgnoredDuringExecution", "none": None}[v["podAntiAffinity"]]
    check(f"{label}: podAntiAffinity {v['podAntiAffinity']}", (list(anti) == [want_anti]) if want_anti else not anti)

    # Services.
    svcs = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    tok, met = svcs.get(fullname), svcs.get(f"{fullname}-metrics")
    if check(f"{label}: Services {fullname} and {fullname}-metrics", tok is not None and met is not None, str(list(svcs))):
        want_port = 443 if tls else 80
        p = tok["spec"]["ports"]
        check(f"{label}: token Service {want_port} -> {tport}", len(p) == 1 and p[0]["port"] == want_port
              and p[0]["targetPort"] == tport, str(p))
        p = met["spec"]["ports"]
        check(f"{label}: metrics Service 9090 -> admin", len(p) == 1 and p[0]["port"] == 9090 and p[0]["targetPort"] == "admin")
        for s in (tok, met):
            check(f"{label}: Service {s['metadata']['name']} selects the operator pods",
                  s["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"])

    # PDB.
    pdbs = by_kind.get("PodDisruptionBudget", [])
    if replicas > 1 and v["podDisruptionBudget"]["enabled"]:
        check(f"{label}: PDB minAvailable {v['podDisruptionBudget']['minAvailable']}", len(pdbs) == 1
              and pdbs[0]["spec"]["minAvailable"] == v["podDisruptionBudget"]["minAvailable"]
              and pdbs[0]["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"])
    else:
        check(f"{label}: no PDB with {replicas} replica(s)", not pdbs)

    # TLS objects.
    certs = {x["metadata"]["name"]: x for x in by_kind.get("Certificate", [])}
    if tls and v["tls"]["certManager"]["enabled"]:
        cert = certs.get(fullname)
        if check(f"{label}: serving Certificate {fullname}", cert is not None):
            host = f"{fullname}.{NAMESPACE}.svc"
            check(f"{label}: Certificate covers the Service DNS names",
                  {fullname, f"{fullname}.{NAMESPACE}", host, f"{host}.{v['config']['clusterDomain']}"}
                  <= set(cert["spec"]["dnsNames"]), str(cert["spec"]["dnsNames"]))
            check(f"{label}: Certificate secretName is the mounted Secret", cert["spec"]["secretName"] == f"{fullname}-tls")
            ref = v["tls"]["certManager"]["issuerRef"]
            want_ref = ({"name": ref["name"], "kind": ref["kind"], "group": ref["group"]} if ref["name"]
                        else {"name": f"{fullname}-ca", "kind": "Issuer", "group": "cert-manager.io"})
            check(f"{label}: Certificate issuerRef", cert["spec"]["issuerRef"] == want_ref, str(cert["spec"]["issuerRef"]))
            issuers = {x["metadata"]["name"] for x in by_kind.get("Issuer", [])}
            if not ref["name"]:
                check(f"{label}: self-signed CA chain rendered", issuers == {f"{fullname}-selfsigned", f"{fullname}-ca"}
                      and f"{fullname}-ca" in certs and certs[f"{fullname}-ca"]["spec"].get("isCA") is True)
            else:
                check(f"{label}: no self-signed CA with an explicit issuerRef", not issuers and len(certs) == 1)
    else:
        check(f"{label}: no cert-manager objects", not certs and not by_kind.get("Issuer"))

    # NetworkPolicy.
    nps = by_kind.get("NetworkPolicy", [])
    if v["networkPolicy"]["enabled"]:
        if check(f"{label}: one NetworkPolicy", len(nps) == 1):
            np_ = nps[0]["spec"]
            ing_ports = {p["port"] for rule in np_.get("ingress", []) for p in rule.get("ports", [])}
            eg_ports = {p["port"] for rule in np_.get("egress", []) for p in rule.get("ports", [])}
            want_in = {8443} | ({9090} if v["networkPolicy"]["metrics"]["namespaceSelectors"] else set())
            check(f"{label}: NetworkPolicy ingress ports {sorted(want_in)}", ing_ports == want_in, str(ing_ports))
            check(f"{label}: NetworkPolicy egress to DNS and the API server",
                  eg_ports == {53} | set(v["networkPolicy"]["apiServer"]["ports"]), str(eg_ports))
            check(f"{label}: NetworkPolicy selects the operator pods",
                  np_["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
                  and sorted(np_["policyTypes"]) == ["Egress", "Ingress"])
    else:
        check(f"{label}: no NetworkPolicy", not nps)

    # ServiceMonitor.
    sms = by_kind.get("ServiceMonitor", [])
    if v["serviceMonitor"]["enabled"]:
        if check(f"{label}: one ServiceMonitor", len(sms) == 1) and met is not None:
            sm = sms[0]["spec"]
            check(f"{label}: ServiceMonitor selects the metrics Service only",
                  all(met["metadata"]["labels"].get(k) == val for k, val in sm["selector"]["matchLabels"].items())
                  and not all(tok["metadata"]["labels"].get(k) == val for k, val in sm["selector"]["matchLabels"].items()))
            check(f"{label}: ServiceMonitor scrapes admin /metrics",
                  sm["endpoints"][0]["port"] == "admin" and sm["endpoints"][0]["path"] == "/metrics")
    else:
        check(f"{label}: no ServiceMonitor", not sms)

    check_vap(label, docs, v, crds, sa_user)


def check_invalid(path: str) -> None:
    label = "invalid/" + os.path.basename(path)
    first = open(path).readline()
    m = re.match(r"^#\s*expect:\s*(.+?)\s*$", first)
    if not check(f"{label}: has an `# expect:` line", bool(m)):
        return
    r = helm("template", RELEASE, CHART, "-f", path, "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION)
    check(f"{label}: rejected (non-zero exit) with {m.group(1)!r}", r.returncode != 0 and m.group(1) in r.stderr,
          f"exit {r.returncode}: {r.stderr.strip()[-600:]}")


def check_notes(crds: dict) -> None:
    """NOTES.txt: the inline example must be valid Agent/DelegationGrant/AgentRun objects."""
    r = helm("install", RELEASE, CHART, "--dry-run=client", "--namespace", NAMESPACE)
    if not check("NOTES.txt renders (helm install --dry-run=client)", r.returncode == 0 and "NOTES:" in r.stdout,
                 r.stderr[-800:]):
        return
    notes = r.stdout.split("NOTES:", 1)[1]
    for want in ("kubectl get agentruns", "token endpoint:", "examples/", "kubectl apply", "crds/"):
        check(f"NOTES.txt mentions {want!r}", want in notes)
    m = re.search(r"<<'YAML' \| kubectl apply -f -\n(.*?)\nYAML\n", notes, re.S)
    if not check("NOTES.txt has an inline example", bool(m)):
        return
    objs = [d for d in yaml.safe_load_all(m.group(1)) if d]
    check("NOTES.txt example: a ResourceServer, an Agent, a DelegationGrant and an AgentRun",
          [o.get("kind") for o in objs] == ["ResourceServer", "Agent", "DelegationGrant", "AgentRun"])
    for o in objs:
        crd = crds.get(o.get("kind"))
        if crd is None:
            continue
        schema = openapi_to_jsonschema(crd_schema(crd))
        schema["properties"].pop("status", None)
        schema["properties"].update({"apiVersion": {"const": "deputy.dev/v1alpha1"},
                                     "kind": {"const": o["kind"]}, "metadata": {"type": "object"}})
        errs = sorted(jsonschema.Draft7Validator(schema).iter_errors(o), key=str)
        check(f"NOTES.txt example {o['kind']} is valid against its CRD schema", not errs,
              "; ".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errs)[:800])


def check_values_documented() -> None:
    """Every leaf of values.yaml has a comment and appears in the README's values table."""
    text = open(os.path.join(CHART, "values.yaml")).read()
    readme = open(os.path.join(CHART, "README.md")).read()
    schema = json.load(open(os.path.join(CHART, "values.schema.json")))
    check("values.schema.json is draft 7 with additionalProperties false at the top",
          schema.get("$schema", "").startswith("http://json-schema.org/draft-07") and schema.get("additionalProperties") is False)
    defaults = yaml.safe_load(text)
    errs = list(jsonschema.Draft7Validator(schema).iter_errors(defaults))
    check("values.yaml is valid against values.schema.json", not errs, "; ".join(e.message for e in errs)[:500])

    def leaves(d, prefix=""):
        for k, val in d.items():
            key = f"{prefix}{k}"
            if isinstance(val, dict) and val and key not in ("resources",):
                yield from leaves(val, key + ".")
            else:
                yield key

    def schema_knows(key):
        s = schema
        for part in key.split("."):
            s = (s.get("properties") or {}).get(part)
            if s is None:
                return False
        return True

    missing_readme = [k for k in leaves(defaults) if f"`{k}`" not in readme]
    check("every value is in the chart README's values table", not missing_readme, str(missing_readme))
    missing_schema = [k for k in leaves(defaults) if not schema_knows(k)]
    check("every value is in values.schema.json", not missing_schema, str(missing_schema))


def main() -> int:
    os.chdir(ROOT)
    if not os.access(HELM, os.X_OK):
        print(f"FAIL helm not found at {HELM}: run scripts/install-tools")
        return 1
    crds = load_crds()
    expected = load_expected_rbac()
    check_values_documented()
    lint = helm("lint", "--strict", CHART, "--kube-version", KUBE_VERSION)
    check("helm lint --strict (defaults)", lint.returncode == 0, (lint.stdout + lint.stderr)[-1500:])

    valid = sorted(glob.glob(os.path.join(HERE, "valid", "*.yaml")))
    invalid = sorted(glob.glob(os.path.join(HERE, "invalid", "*.yaml")))
    check("there are valid and invalid values cases", len(valid) >= 3 and len(invalid) >= 3)
    for p in valid:
        try:
            check_render("valid/" + os.path.basename(p), p, crds, expected)
        except Exception:  # noqa: BLE001
            check(f"valid/{os.path.basename(p)}: checks ran", False, traceback.format_exc()[-1500:])
    for p in invalid:
        check_invalid(p)
    check_notes(crds)

    print(f"{PASSED} passed, {FAILED} failed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
