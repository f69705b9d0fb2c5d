"""One stored object (a node, namespace, pod or policy document) parsed alone.

A store (etcd) holds each object as its own document: a node, namespace or
pod in the cluster file's per-object form (one entry of its `nodes`,
`namespaces` or `pods` list), a policy as a CiliumEgressGatewayPolicy
document, as JSON or YAML.  Each is parsed here on its own, so a malformed
one is an ObjectError naming its key and field, and the others stand.
"""
from __future__ import annotations

import json
from typing import Mapping

import yaml

from ..cluster import ClusterError, namespace_from_dict, node_from_dict, pod_from_dict
from ..errors import EgressError
from ..files import load_yaml
from ..policy import PolicyError, parse_policy

__all__ = ["KINDS", "MAX_OBJECT_BYTES", "ObjectError", "parse_object", "object_document", "decode_document"]

# Per object: a real policy or pod is well under 4 KiB; a 64-gateway policy with
# a few hundred CIDRs stays under 64 KiB.  etcd's own request limit is 1.5 MiB.
MAX_OBJECT_BYTES = 128 << 10
KINDS = {"nodes": "node", "namespaces": "namespace", "pods": "pod", "policies": "policy"}


class ObjectError(EgressError, ValueError):
    """A stored object left out: its key, the field (when one is to blame), what is wrong."""

    def __init__(self, key, message, field=None):
        self.key, self.message, self.field = key, message, field
        super().__init__(str(self))

    def __str__(self):
        return ": ".join(x for x in (self.key, self.field, self.message) if x)


def decode_document(key, raw: bytes):
    """The mapping stored under `key` (JSON, or YAML); ObjectError if too large or not a document."""
    if len(raw) > MAX_OBJECT_BYTES:
        raise ObjectError(key, f"is {len(raw)} bytes, over the limit of {MAX_OBJECT_BYTES} bytes per object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ObjectError(key, "is not UTF-8 text") from None
    try:
        doc = json.loads(text) if text.lstrip().startswith("{") else load_yaml(text)
    except (ValueError, yaml.YAMLError) as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ObjectError(key, f"is not a JSON or YAML document: {problem}") from None
    if not isinstance(doc, Mapping):
        raise ObjectError(key, f"must be a mapping, not {type(doc).__name__}")
    return doc


def parse_object(kind, names, key, raw: bytes):
    """(change key, object) of the document `raw` stored for `kind` ("nodes",
    ...) under `names` (the key's parts after the kind: [name], or
    [namespace, name] for a pod); ObjectError naming `key` and the field."""
    doc = decode_document(key, raw)
    want = 2 if kind == "pods" else 1
    if len(names) != want or not all(names):
        layout = "pods/<namespace>/<name>" if kind == "pods" else f"{kind}/<name>"
        raise ObjectError(key, f"the key does not follow the layout {layout}")
    if kind == "policies":
        try:
            policy, _ = parse_policy(doc, source=f"etcd {key}")
        except PolicyError as exc:
            raise ObjectError(key, exc.message, exc.path) from None
        if policy.name != names[0]:
            raise ObjectError(key, f"{policy.name!r} does not match the key's name {names[0]!r}", "metadata.name")
        return policy.name, policy
    if kind == "pods":
        ns = doc.get("namespace", names[0])   # (a missing namespace is the key's)
        if ns != names[0]:
            raise ObjectError(key, f"{ns!r} does not match the key's namespace {names[0]!r}", "namespace")
        if "namespace" not in doc:
            doc = {**doc, "namespace": ns}
    where = f"{kind}[0]"  # the first of a cluster file's list: fields named as the file loader names them
    try:
        obj = _BUILD[kind](doc, where)
        if kind == "pods" and len(set(obj.ips)) != len(obj.ips):
            ip = next(ip for i, ip in enumerate(obj.ips) if ip in obj.ips[:i])
            raise ClusterError(f"duplicate pod IP {ip!r} (also in {where})", field=f"{where}.ips")
    except ClusterError as exc:
        field = exc.field or ""
        field = field[len(where):].lstrip(".") if field.startswith(where) else field
        raise ObjectError(key, exc.message, field or None) from None
    if obj.name != names[-1]:
        raise ObjectError(key, f"{obj.name!r} does not match the key's name {names[-1]!r}", "name")
    return (obj.uid if kind == "pods" else obj.name), obj


_BUILD = {"nodes": node_from_dict, "namespaces": namespace_from_dict, "pods": pod_from_dict}


def object_document(obj) -> dict:
    """The per-object document of a Node, Namespace or Pod (as a cluster file holds it)."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "uid"):
        return {"name": obj.name, "namespace": obj.namespace, "uid": obj.uid, "labels": dict(obj.labels),
                "ips": list(obj.ips), "node": obj.node}
    return {"name": obj.name, "labels": dict(obj.labels)}
