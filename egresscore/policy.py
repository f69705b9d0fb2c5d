"""CiliumEgressGatewayPolicy documents: load, validate, match.

Policies are read exactly as Cilium users write them (apiVersion cilium.io/v2,
kind CiliumEgressGatewayPolicy), from files or folders, multi-document files
included.  Each document is validated on its own: a bad one yields a
PolicyError naming the file, the document, the policy and the field path, and
the others still load.

Matching follows Cilium's pkg/egressgateway/policy.go (ParseCEGP): a pod is
selected when it matches any entry of `selectors` (namespaceSelector AND
podSelector of that entry) and, when any entry has a nodeSelector, its node
matches one of them.  Namespace labels are seen by selectors under Cilium's
`io.cilium.k8s.namespace.labels.` prefix and the pod's namespace under
`io.kubernetes.pod.namespace`, so pod selectors written against those keys work
as in Cilium.  (Cilium's other identity labels, e.g. the service account, are
not modelled.)  A label source prefix in a selector key ("k8s:app") is ignored.

Validation is stricter than Cilium's agent where the API server would refuse
the object anyway: unknown fields, non-string label values, bad object names
and malformed matchExpressions are errors.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, NamedTuple

import yaml

from .errors import EgressError
from .files import InputFileError, load_yaml, read_input_file, yaml_line_of

__all__ = [
    "API_VERSION",
    "KIND",
    "MAX_GATEWAYS",
    "EXTRA_EGRESS_IPS",
    "POD_NAMESPACE_LABEL",
    "NAMESPACE_LABEL_PREFIX",
    "LabelSelector",
    "Requirement",
    "EgressRule",
    "EgressGateway",
    "EgressPolicy",
    "PolicyError",
    "LoadResult",
    "load_policies",
    "parse_policy",
    "parse_label_selector",
]

API_VERSION = "cilium.io/v2"
KIND = "CiliumEgressGatewayPolicy"
LIST_KINDS = ("List", "CiliumEgressGatewayPolicyList")
MAX_GATEWAYS = 64  # EGRESS_GW_HA_MAX_GATEWAY_NODES / the CRD's maxItems
# An egresscore extension that keeps the CRD as Cilium reads it: more egress IPs
# on the gateway node, comma-separated, used in order when the egress IP has no
# free port for a new connection (egresscore.NatTable.set_spill).
EXTRA_EGRESS_IPS = "egresscore.io/extra-egress-ips"
MAX_EXTRA_EGRESS_IPS = 8  # per family (the NAT's NAT_MAX_SPILL)
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
NAMESPACE_LABEL_PREFIX = "io.cilium.k8s.namespace.labels."
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
POLICY_SUFFIXES = (".yaml", ".yml", ".json")

_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DOC_SPLIT_RE = re.compile(r"^---(?:[ \t].*)?$", re.MULTILINE)


class PolicyError(EgressError, ValueError):
    """A rejected policy document: where it is and what is wrong with it.

    file, document (from 1), line (of the bad field when it is found, else
    the document's first line), policy (its name) and path (the field,
    "spec.destinationCIDRs[0]")."""

    def __init__(self, message, *, file=None, document=None, line=None, policy=None, path=None):
        self.message = message
        self.file = file
        self.document = document
        self.line = line
        self.policy = policy
        self.path = path
        super().__init__(str(self))

    def __str__(self):
        where = []
        if self.file is not None:
            where.append(str(self.file))
        if self.document is not None:
            doc = f"document {self.document}"
            if self.line is not None:
                doc += f" (line {self.line})"
            where.append(doc)
        if self.policy:
            where.append(f"policy {self.policy!r}")
        if self.path:
            where.append(self.path)
        where.append(self.message)
        return ": ".join(where)


class _FieldError(Exception):
    """Raised while walking one document; becomes a PolicyError with context."""

    def __init__(self, path, message):
        super().__init__(message)
        self.path = path
        self.message = message


# --------------------------------------------------------------------------
# label selectors


@dataclass(frozen=True)
class Requirement:
    """One matchExpressions entry (Kubernetes label selector semantics)."""

    key: str
    operator: str
    values: frozenset = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        op = self.operator
        if op == "In":
            return self.key in labels and labels[self.key] in self.values
        if op == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if op == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist


@dataclass(frozen=True)
class LabelSelector:
    """matchLabels AND matchExpressions; an empty selector selects everything."""

    match_labels: tuple = ()  # sorted ((key, value), ...)
    match_expressions: tuple = ()  # (Requirement, ...)

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.match_labels:
            if labels.get(key) != value:
                return False
        for req in self.match_expressions:
            if not req.matches(labels):
                return False
        return True

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def prefixed(self, prefix: str) -> "LabelSelector":
        """The same selector over keys carrying `prefix` (Cilium's namespace labels)."""
        return LabelSelector(
            tuple((prefix + k, v) for k, v in self.match_labels),
            tuple(Requirement(prefix + r.key, r.operator, r.values) for r in self.match_expressions),
        )

    def index_hint(self):
        """A (key, values) that every selected label set must carry, or None."""
        if self.match_labels:
            key, value = self.match_labels[0]
            return key, (value,)
        for req in self.match_expressions:
            if req.operator == "In":
                return req.key, tuple(sorted(req.values))
        return None

    def to_dict(self) -> dict:
        out = {}
        if self.match_labels:
            out["matchLabels"] = dict(self.match_labels)
        if self.match_expressions:
            out["matchExpressions"] = [
                {"key": r.key, "operator": r.operator, **({"values": sorted(r.values)} if r.values else {})}
                for r in self.match_expressions
            ]
        return out


def _strip_source(key: str) -> str:
    # Cilium selectors may name a label source ("k8s:app", "any:app"); our
    # labels all come from Kubernetes, so the source prefix is dropped.
    for source in ("k8s:", "any:"):
        if key.startswith(source):
            return key[len(source):]
    return key


def _check_keys(obj: Mapping, allowed: Iterable[str], path: str):
    for key in obj:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise _FieldError(where, "unknown field (allowed: " + ", ".join(allowed) + ")")


def _expect_map(obj, path):
    if not isinstance(obj, Mapping):
        raise _FieldError(path, f"must be a mapping, not {_kind_of(obj)}")
    return obj


def _expect_list(obj, path):
    if not isinstance(obj, list):
        raise _FieldError(path, f"must be a list, not {_kind_of(obj)}")
    return obj


def _expect_str(obj, path, *, allow_empty=False):
    if not isinstance(obj, str):
        raise _FieldError(path, f"must be a string, not {_kind_of(obj)} {obj!r} (quote it)")
    if not allow_empty and not obj:
        raise _FieldError(path, "must not be empty")
    return obj


def _kind_of(obj):
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "a boolean"
    if isinstance(obj, (int, float)):
        return "a number"
    if isinstance(obj, str):
        return "a string"
    if isinstance(obj, list):
        return "a list"
    if isinstance(obj, Mapping):
        return "a mapping"
    return type(obj).__name__


def _parse_selector(obj, path) -> LabelSelector:
    obj = _expect_map({} if obj is None else obj, path)
    _check_keys(obj, ("matchLabels", "matchExpressions"), path)
    labels = []
    ml = obj.get("matchLabels")
    if ml is not None:
        _expect_map(ml, f"{path}.matchLabels")
        for key, value in ml.items():
            _expect_str(key, f"{path}.matchLabels")
            _expect_str(value, f"{path}.matchLabels.{key}", allow_empty=True)
            labels.append((_strip_source(key), value))
    exprs = []
    me = obj.get("matchExpressions")
    if me is not None:
        _expect_list(me, f"{path}.matchExpressions")
        for i, expr in enumerate(me):
            p = f"{path}.matchExpressions[{i}]"
            _expect_map(expr, p)
            _check_keys(expr, ("key", "operator", "values"), p)
            if "key" not in expr:
                raise _FieldError(f"{p}.key", "is required")
            key = _strip_source(_expect_str(expr["key"], f"{p}.key"))
            op = expr.get("operator")
            if op not in OPERATORS:
                raise _FieldError(f"{p}.operator", f"{op!r} is not one of {', '.join(OPERATORS)}")
            values = expr.get("values") or []
            _expect_list(values, f"{p}.values")
            for j, v in enumerate(values):
                _expect_str(v, f"{p}.values[{j}]", allow_empty=True)
            if op in ("In", "NotIn") and not values:
                raise _FieldError(f"{p}.values", f"must be non-empty for operator {op}")
            if op in ("Exists", "DoesNotExist") and values:
                raise _FieldError(f"{p}.values", f"must be empty for operator {op}")
            exprs.append(Requirement(key, op, frozenset(values)))
    seen = {}
    for key, value in labels:
        seen[key] = value
    return LabelSelector(tuple(sorted(seen.items())), tuple(exprs))


def parse_label_selector(obj, path: str = "selector") -> LabelSelector:
    """A Kubernetes LabelSelector mapping as a LabelSelector (ValueError if bad)."""
    try:
        return _parse_selector(obj, path)
    except _FieldError as exc:
        raise PolicyError(exc.message, path=exc.path) from None


# --------------------------------------------------------------------------
# the policy model


@dataclass(frozen=True)
class EgressRule:
    """One `selectors[]` entry; None means the field was absent."""

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    node_selector: LabelSelector | None = None

    def endpoint_selector(self) -> tuple:
        """The selectors a pod's labels must all match (Cilium's EndpointSelector)."""
        parts = []
        if self.namespace_selector is not None:
            ns = self.namespace_selector
            if ns.empty:  # selects all namespaces: a namespace label exists
                parts.append(LabelSelector((), (Requirement(POD_NAMESPACE_LABEL, "Exists"),)))
            else:
                parts.append(ns.prefixed(NAMESPACE_LABEL_PREFIX))
        if self.pod_selector is not None:
            parts.append(self.pod_selector)
        return tuple(parts)


@dataclass(frozen=True)
class EgressGateway:
    """A gateway: which node (first match by name) and which egress IP."""

    node_selector: LabelSelector
    interface: str | None = None
    egress_ip: str | None = None


@dataclass(frozen=True)
class EgressPolicy:
    """A validated CiliumEgressGatewayPolicy."""

    name: str
    selectors: tuple  # (EgressRule, ...)
    destination_cidrs: tuple  # canonical CIDR strings
    excluded_cidrs: tuple = ()
    gateways: tuple = ()  # (EgressGateway, ...): egressGateways, else (egressGateway,)
    source: str = ""  # "file: document N", for messages
    extra_egress_ips: tuple = ()  # EXTRA_EGRESS_IPS annotation: spill IPs on the gateway node, in order
    endpoint_selectors: tuple = field(init=False, repr=False, compare=False)
    node_selectors: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "endpoint_selectors", tuple(r.endpoint_selector() for r in self.selectors))
        object.__setattr__(
            self, "node_selectors", tuple(r.node_selector for r in self.selectors if r.node_selector is not None)
        )

    def matches_labels(self, labels: Mapping[str, str]) -> bool:
        """Does a pod with these (namespace-augmented) labels match a selector?"""
        for parts in self.endpoint_selectors:
            for sel in parts:
                if not sel.matches(labels):
                    break
            else:
                return True
        return False

    def matches_node(self, node_labels: Mapping[str, str]) -> bool:
        """selectors[].nodeSelector: the pod's node must match one, if any is set."""
        if not self.node_selectors:
            return True
        return any(sel.matches(node_labels) for sel in self.node_selectors)

    @property
    def families(self) -> frozenset:
        return frozenset(6 if ":" in c else 4 for c in self.destination_cidrs)


class LoadResult(NamedTuple):
    """What load_policies found: the good policies, the rejected documents, warnings."""

    policies: list
    errors: list
    warnings: list


def _parse_ip(value, path):
    _expect_str(value, path)
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise _FieldError(path, f"{value!r} is not an IP address") from None


def _parse_cidr(value, path):
    if not isinstance(value, str):
        raise _FieldError(path, f"{value!r} is not a CIDR (must be a string like '203.0.113.0/24')")
    try:
        if "/" not in value:
            raise ValueError
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise _FieldError(path, f"{value!r} is not a CIDR") from None


def _parse_gateway(obj, path) -> EgressGateway:
    _expect_map(obj, path)
    _check_keys(obj, ("nodeSelector", "interface", "egressIP"), path)
    if obj.get("nodeSelector") is None:
        raise _FieldError(f"{path}.nodeSelector", "is required")
    sel = _parse_selector(obj["nodeSelector"], f"{path}.nodeSelector")
    iface = obj.get("interface") or None
    egress_ip = obj.get("egressIP") or None
    if iface is not None and egress_ip is not None:
        raise _FieldError(path, "can't specify both an interface and an egress IP")
    if iface is not None:
        _expect_str(iface, f"{path}.interface")
    if egress_ip is not None:
        egress_ip = str(_parse_ip(egress_ip, f"{path}.egressIP"))
    return EgressGateway(sel, iface, egress_ip)


def _parse_spec(spec, warnings):
    _expect_map(spec, "spec")
    _check_keys(spec, ("selectors", "destinationCIDRs", "excludedCIDRs", "egressGateway", "egressGateways"), "spec")

    if spec.get("selectors") is None:
        raise _FieldError("spec.selectors", "is required")
    rules = []
    for i, rule in enumerate(_expect_list(spec["selectors"], "spec.selectors")):
        p = f"spec.selectors[{i}]"
        _expect_map(rule, p)
        _check_keys(rule, ("podSelector", "namespaceSelector", "nodeSelector"), p)
        pod = ns = node = None
        if "podSelector" in rule:
            pod = _parse_selector(rule["podSelector"], f"{p}.podSelector")
        if "namespaceSelector" in rule:
            ns = _parse_selector(rule["namespaceSelector"], f"{p}.namespaceSelector")
        if "nodeSelector" in rule:
            node = _parse_selector(rule["nodeSelector"], f"{p}.nodeSelector")
        if pod is None and ns is None:
            raise _FieldError(p, "needs a podSelector or a namespaceSelector (Cilium rejects a selector with neither)")
        rules.append(EgressRule(pod, ns, node))

    if spec.get("destinationCIDRs") is None:
        raise _FieldError("spec.destinationCIDRs", "is required")
    dst = []
    for i, c in enumerate(_expect_list(spec["destinationCIDRs"], "spec.destinationCIDRs")):
        dst.append(_parse_cidr(c, f"spec.destinationCIDRs[{i}]"))
    excl = []
    for i, c in enumerate(_expect_list(spec.get("excludedCIDRs") or [], "spec.excludedCIDRs")):
        net = _parse_cidr(c, f"spec.excludedCIDRs[{i}]")
        if not any(net.version == d.version and net.subnet_of(d) for d in dst):
            warnings.append(
                f"spec.excludedCIDRs[{i}]: {str(net)!r} is not inside any destinationCIDR "
                "(its excluded entries are still installed, as in Cilium)"
            )
        excl.append(net)

    gateways = []
    plural = spec.get("egressGateways")
    if plural is not None:
        _expect_list(plural, "spec.egressGateways")
        if len(plural) > MAX_GATEWAYS:
            raise _FieldError("spec.egressGateways", f"has {len(plural)} gateways, at most {MAX_GATEWAYS} are allowed")
        for i, gw in enumerate(plural):
            gateways.append(_parse_gateway(gw, f"spec.egressGateways[{i}]"))
    if gateways:
        if spec.get("egressGateway") is not None:  # not even parsed, as in Cilium's ParseCEGP
            warnings.append("spec.egressGateway is ignored because spec.egressGateways is set (as in Cilium)")
    else:
        if spec.get("egressGateway") is None:
            raise _FieldError("spec.egressGateway", "is required (or a non-empty spec.egressGateways)")
        gateways.append(_parse_gateway(spec["egressGateway"], "spec.egressGateway"))

    return (
        tuple(rules),
        tuple(dict.fromkeys(str(n) for n in dst)),
        tuple(dict.fromkeys(str(n) for n in excl)),
        tuple(gateways),
    )


def _parse_extra_egress_ips(meta, families, gateways) -> tuple:
    """The EXTRA_EGRESS_IPS annotation: distinct addresses of the policy's
    families, none an egressIP of the policy; whether each is on the
    gateway node is checked where it is resolved (egresscore.compiler)."""
    ann = meta.get("annotations")
    if ann is None:
        return ()
    _expect_map(ann, "metadata.annotations")
    raw = ann.get(EXTRA_EGRESS_IPS)
    if raw is None:
        return ()
    path = f"metadata.annotations.{EXTRA_EGRESS_IPS}"
    _expect_str(raw, path)
    out = []
    for i, part in enumerate(raw.split(",")):
        if not part.strip():
            raise _FieldError(f"{path}[{i}]", "is empty (a comma-separated list of IP addresses)")
        ip = _parse_ip(part, f"{path}[{i}]")
        if ip.version not in families:
            raise _FieldError(f"{path}[{i}]", f"{ip} is IPv{ip.version}, but the policy has no IPv{ip.version} "
                              "destinationCIDRs (an extra egress IP must be of its egress IP's family)")
        if str(ip) in out:
            raise _FieldError(f"{path}[{i}]", f"{ip} is listed twice")
        if any(gw.egress_ip == str(ip) for gw in gateways):
            raise _FieldError(f"{path}[{i}]", f"{ip} is the policy's egressIP already")
        out.append(str(ip))
    for v in (4, 6):
        if sum(1 for a in out if (":" in a) == (v == 6)) > MAX_EXTRA_EGRESS_IPS:
            raise _FieldError(path, f"lists more than {MAX_EXTRA_EGRESS_IPS} IPv{v} addresses")
    return tuple(out)


def parse_policy(doc: Any, *, source: str = "") -> tuple:
    """One parsed YAML document as (EgressPolicy, warnings); PolicyError if bad.

    The error carries the policy name and field path; the caller adds file and
    document.
    """
    name = None
    try:
        _expect_map(doc, "")
        api = doc.get("apiVersion")
        kind = doc.get("kind")
        if kind is None:
            raise _FieldError("kind", f"is required (must be {KIND!r})")
        if kind != KIND:
            raise _FieldError("kind", f"{kind!r} is not {KIND!r}")
        if api is None:
            raise _FieldError("apiVersion", f"is required (must be {API_VERSION!r})")
        if api != API_VERSION:
            raise _FieldError("apiVersion", f"{api!r} is not {API_VERSION!r}")
        _check_keys(doc, ("apiVersion", "kind", "metadata", "spec", "status"), "")
        meta = _expect_map(doc.get("metadata") or {}, "metadata")
        raw_name = meta.get("name")
        if raw_name is None or raw_name == "":
            raise _FieldError("metadata.name", "is required (Cilium rejects a policy without a name)")
        name = _expect_str(raw_name, "metadata.name")
        if len(name) > 253 or not _NAME_RE.match(name):
            raise _FieldError("metadata.name", f"{name!r} is not a valid Kubernetes object name")
        if doc.get("spec") is None:
            raise _FieldError("spec", "is required")
        warnings = []
        rules, dst, excl, gws = _parse_spec(doc["spec"], warnings)
        families = frozenset(6 if ":" in c else 4 for c in dst)
        for gw in gws:
            fam = 6 if gw.egress_ip and ":" in gw.egress_ip else 4
            if gw.egress_ip and fam not in families:
                # as upstream: the egressIP of a family with no destination CIDR only picks the interface
                warnings.append(f"egressIP {gw.egress_ip} is IPv{fam} but no destinationCIDR is: it only picks "
                                f"the interface, whose first IPv{10 - fam} address is the egress IP")
        extra = _parse_extra_egress_ips(meta, families, gws)
    except _FieldError as exc:
        raise PolicyError(exc.message, policy=name, path=exc.path or None) from None
    return EgressPolicy(name, rules, dst, excl, gws, source=source, extra_egress_ips=extra), warnings


def _split_documents(text):
    """(first line number, text) of each YAML document, so one bad one stays alone."""
    starts = [0] + [m.start() for m in _DOC_SPLIT_RE.finditer(text)]
    out = []
    line = 1
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(text)
        chunk = text[start:end]
        if not (start == 0 and not chunk.strip()):
            out.append((line, chunk))
        line += chunk.count("\n")  # counted chunk by chunk: linear in the file's size
    return out


def _iter_files(path, errors):
    """The policy files under `path` (a file, or a folder walked in sorted
    order); a subfolder that cannot be listed is an error, not a gap."""
    if os.path.isdir(path):
        found = []

        def unreadable(exc):
            errors.append(PolicyError(f"cannot list folder: {exc.strerror or exc}", file=exc.filename))

        for root, dirs, files in os.walk(path, onerror=unreadable):
            dirs.sort()
            for f in sorted(files):
                if f.endswith(POLICY_SUFFIXES) and not f.startswith("."):
                    found.append(os.path.join(root, f))
        return found
    return [path]


def load_policies(*paths) -> LoadResult:
    """Load every CiliumEgressGatewayPolicy under these files or folders.

    Never raises for bad input: each rejected document (or unreadable file)
    is a PolicyError in `errors` and the other documents load.  Files are read
    with egresscore.files.read_input_file (regular files only, at most
    MAX_INPUT_BYTES each).  A file with no document (empty, or only comments)
    is an error: it is what a half-written edit looks like.  Duplicate names
    keep the first definition (files in sorted order) and reject the later
    one.  For all-or-nothing loading (the agent, the CLI) see
    egresscore.inputs.
    """
    policies, errors, warnings = [], [], []
    by_name = {}
    for path in paths:
        path = os.fspath(path)
        if not os.path.exists(path):
            errors.append(PolicyError("no such file or folder", file=path))
            continue
        for file in _iter_files(path, errors):
            try:
                text = read_input_file(file)
            except InputFileError as exc:
                errors.append(PolicyError(exc.message, file=file))
                continue
            number = 0
            for line, chunk in _split_documents(text):
                try:
                    doc = load_yaml(chunk)
                except yaml.YAMLError as exc:
                    number += 1
                    mark = getattr(exc, "problem_mark", None)
                    where = f" at line {line + mark.line}" if mark is not None else ""
                    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                    errors.append(PolicyError(f"invalid YAML{where}: {problem}", file=file, document=number, line=line))
                    continue
                if doc is None:
                    continue
                number += 1
                items, listed = [doc], False
                if isinstance(doc, Mapping) and doc.get("kind") in LIST_KINDS:
                    items, listed = doc.get("items"), True
                    if not isinstance(items, list):
                        errors.append(PolicyError(f"must be a list, not {_kind_of(items)}", file=file,
                                                  document=number, line=line, path="items"))
                        continue
                for i, item in enumerate(items):
                    source = f"{file}: document {number}"
                    try:
                        policy, warns = parse_policy(item, source=source)
                    except PolicyError as exc:
                        # the line of the bad field, else the document's first line
                        field = f"items[{i}].{exc.path or ''}" if listed else exc.path
                        at = yaml_line_of(chunk, field) if field else None
                        exc.file, exc.document, exc.line = file, number, line + at - 1 if at else line
                        errors.append(exc)
                        continue
                    for w in warns:
                        warnings.append(f"{source}: policy {policy.name!r}: {w}")
                    if policy.name in by_name:
                        errors.append(
                            PolicyError(
                                f"duplicate policy name, already defined in {by_name[policy.name].source}",
                                file=file, document=number, line=line, policy=policy.name, path="metadata.name",
                            )
                        )
                        continue
                    by_name[policy.name] = policy
                    policies.append(policy)
            if number == 0:
                errors.append(PolicyError("no policy document (the file is empty or only comments; "
                                          "delete the file to remove its policies)", file=file))
    return LoadResult(policies, errors, warnings)
