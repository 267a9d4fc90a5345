"""Strict, offline checks of custom resources against their CRD's openAPIV3Schema.

Stricter than the API server on purpose: where Kubernetes would prune an unknown field
(or a null in a non-nullable field), this reports an error. The CRD schema is turned
into JSON Schema (Draft 4, whose boolean exclusiveMinimum matches OpenAPI 3.0): objects
without additionalProperties (and not x-kubernetes-preserve-unknown-fields) are closed,
`nullable` admits null, x-kubernetes-int-or-string admits both, list-type set/map
duplicates are errors, and a few formats are checked. CEL rules
(x-kubernetes-validations) are not evaluated.
"""
import base64
import binascii
import copy
import datetime
import ipaddress
import json
import re
import sys
import uuid

import jsonschema
from jsonschema import validators

_OBJECTMETA_FIELDS = {
    "annotations", "creationTimestamp", "deletionGracePeriodSeconds",
    "deletionTimestamp", "finalizers", "generateName", "generation", "labels",
    "managedFields", "name", "namespace", "ownerReferences", "resourceVersion",
    "selfLink", "uid",
}
_STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "namespace": {"type": "string"},
        "generateName": {"type": "string"},
        "labels": _STRMAP, "annotations": _STRMAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        **{k: {} for k in _OBJECTMETA_FIELDS
           - {"name", "namespace", "generateName", "labels", "annotations", "finalizers"}},
    },
    "additionalProperties": False,
}

# ---------------------------------------------------------------- formats
_fmt = jsonschema.FormatChecker(formats=())


def _fmt_str(name, **kw):
    def deco(fn):
        def check(v):
            return not isinstance(v, str) or bool(fn(v))
        _fmt.checks(name, **kw)(check)
        return fn
    return deco


@_fmt_str("cidr", raises=ValueError)
def _cidr(v):
    return ipaddress.ip_network(v, strict=False)


@_fmt_str("ipv4", raises=ValueError)
def _ipv4(v):
    return ipaddress.IPv4Address(v)


@_fmt_str("ipv6", raises=ValueError)
def _ipv6(v):
    return ipaddress.IPv6Address(v)


@_fmt_str("uuid", raises=ValueError)
def _uuid(v):
    return uuid.UUID(v)


@_fmt_str("date", raises=ValueError)
def _date(v):
    return datetime.date.fromisoformat(v)


_RFC3339 = re.compile(r"^\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)$")
for _n in ("date-time", "datetime"):
    _fmt_str(_n)(lambda v: _RFC3339.match(v))


@_fmt_str("byte", raises=(binascii.Error, ValueError))
def _byte(v):
    return base64.b64decode(v, validate=True) is not None


for _n, _bits in (("int32", 32), ("int64", 64)):
    _fmt.checks(_n)(lambda v, b=_bits: not isinstance(v, int)
                    or -(2 ** (b - 1)) <= v < 2 ** (b - 1))


# ------------------------------------------------- x-kubernetes-list-type
def _list_type(validator, list_type, instance, schema):
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = []
        for i, item in enumerate(instance):
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate entry {item!r} in list-type=set (index {i})")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = set()
        for i, item in enumerate(instance):
            if not isinstance(item, dict):
                continue
            k = json.dumps([item.get(key) for key in keys], sort_keys=True)
            if k in seen:
                yield jsonschema.ValidationError(
                    f"duplicate map key {({key: item.get(key) for key in keys})} "
                    f"in list-type=map (index {i})")
            seen.add(k)


StrictValidator = validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type})


# ------------------------------------------------------------- conversion
def openapi_to_jsonschema(s, structural=True):
    """Convert one CRD openAPIV3Schema node (returns a new dict).

    structural=False is used below allOf/anyOf/oneOf/not: there nothing is closed.
    """
    if not isinstance(s, dict):
        return s
    out = {}
    for key, val in s.items():
        if key == "properties":
            out[key] = {k: openapi_to_jsonschema(v, structural) for k, v in val.items()}
        elif key in ("items", "not"):
            out[key] = openapi_to_jsonschema(val, structural and key == "items")
        elif key == "additionalProperties":
            out[key] = openapi_to_jsonschema(val, structural) if isinstance(val, dict) else val
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [openapi_to_jsonschema(v, False) for v in val]
        elif key in ("x-kubernetes-validations", "default", "example", "externalDocs",
                     "description", "title", "nullable"):
            continue  # not checkable / documentation only; nullable handled below
        else:
            out[key] = copy.deepcopy(val)

    if s.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if s.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (structural and s.get("type") == "object"
            and "additionalProperties" not in s
            and not s.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if s.get("nullable"):
        t = out.get("type")
        if isinstance(t, str):
            out["type"] = [t, "null"]
        elif isinstance(t, list) and "null" not in t:
            out["type"] = t + ["null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = out["enum"] + [None]
    return out


def _crd_version(crd, version):
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v
    return None


def cr_schema(crd, version):
    """JSON Schema (dict) for a whole CR of `version`, strict root included."""
    v = _crd_version(crd, version)
    if v is None:
        raise KeyError(f"CRD {crd['metadata']['name']} has no version {version}")
    raw = (v.get("schema") or crd["spec"].get("validation") or {}).get("openAPIV3Schema", {})
    root = openapi_to_jsonschema(raw)
    props = root.setdefault("properties", {})
    group = crd["spec"]["group"]
    props["apiVersion"] = {"enum": [f"{group}/{version}"]}
    props["kind"] = {"enum": [crd["spec"]["names"]["kind"]]}
    # CRDs may only constrain metadata.name/generateName: check those, don't close it
    user_meta = raw.get("properties", {}).get("metadata")
    user_meta = openapi_to_jsonschema(user_meta, structural=False) if user_meta else None
    props["metadata"] = ({"allOf": [_METADATA, user_meta]} if user_meta else _METADATA)
    root["type"] = "object"
    root["required"] = sorted(set(root.get("required", [])) | {"apiVersion", "kind", "metadata"})
    if not raw.get("x-kubernetes-preserve-unknown-fields"):
        root["additionalProperties"] = False
    return root


def cr_errors(cr, crd):
    """List of 'path: message' strings; [] means the CR is valid for this CRD."""
    group, _, version = cr.get("apiVersion", "").rpartition("/")
    if group != crd["spec"]["group"] or cr.get("kind") != crd["spec"]["names"]["kind"]:
        return [f": {cr.get('apiVersion')}/{cr.get('kind')} does not belong to CRD "
                f"{crd['metadata']['name']}"]
    v = _crd_version(crd, version)
    if v is None or not v.get("served", True):
        return [f"apiVersion: version {version!r} is not a served version of "
                f"{crd['metadata']['name']}"]
    schema = cr_schema(crd, version)
    StrictValidator.check_schema(schema)
    validator = StrictValidator(schema, format_checker=_fmt)
    errs = sorted(validator.iter_errors(cr), key=lambda e: list(map(str, e.absolute_path)))
    return ["%s: %s" % (".".join(map(str, e.absolute_path)), e.message) for e in errs]


def index_crds(docs):
    """{(group, kind): crd} for every CustomResourceDefinition in docs."""
    return {(d["spec"]["group"], d["spec"]["names"]["kind"]): d for d in docs
            if d.get("kind") == "CustomResourceDefinition"
            and d.get("apiVersion") == "apiextensions.k8s.io/v1"}


