"""Bad policy and cluster files, one per kind: shared by the unit, CLI and lab tests.

Each case turns a good file at `path` into a bad one and says what the error
must name: the message, and the PolicyError / ClusterError fields."""
import copy
import os

import yaml

from egresscore.files import MAX_INPUT_BYTES
from egresscore.lab.kernel import SAMPLE_POLICY


def policy_text(doc=None):
    return yaml.safe_dump(copy.deepcopy(doc or SAMPLE_POLICY), sort_keys=False)


GOOD_POLICY = policy_text()


def _mutated(change):
    doc = copy.deepcopy(SAMPLE_POLICY)
    change(doc)
    return policy_text(doc)


def _write(text):
    def make(path):
        with open(path, "w") as f:
            f.write(text)
    return make


def _replace(make_special):
    def make(path):
        os.unlink(path)
        make_special(path)
    return make


def _oversize(path):
    with open(path, "a") as f:
        f.truncate(MAX_INPUT_BYTES + 1)


# (id, make(path), expected message substring, expected PolicyError fields)
POLICY_CASES = [
    ("broken_yaml", _write(GOOD_POLICY.replace("  selectors:\n", "  selectors: [\n", 1)),
     "invalid YAML at line 7", {"document": 1, "line": 1}),
    ("cidr_33", _write(GOOD_POLICY.replace("203.0.113.0/24", "203.0.113.0/33")),
     "'203.0.113.0/33' is not a CIDR",
     {"document": 1, "line": 11, "policy": "egress-sample", "path": "spec.destinationCIDRs[0]"}),
    ("unknown_field", _write(_mutated(lambda d: d["spec"].update(colour="red"))),
     "unknown field", {"document": 1, "line": 19, "policy": "egress-sample", "path": "spec.colour"}),
    ("empty", _write(""), "no policy document", {"document": None}),
    ("comments_only", _write("# all policies commented out\n"), "no policy document", {"document": None}),
    ("removed", os.unlink, "no such file or folder", {}),
    ("fifo", _replace(os.mkfifo), "not a regular file (a FIFO)", {}),
    ("dev_zero", _replace(lambda p: os.symlink("/dev/zero", p)), "not a regular file (a character device)", {}),
    ("oversized", _oversize, "over the limit of 4.0 MiB per file", {}),
]


def _cluster(change):
    def make(path, good):
        doc = copy.deepcopy(good)
        change(doc)
        with open(path, "w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
    return make


def _broken_cluster(path, good):
    with open(path, "w") as f:
        f.write(yaml.safe_dump(good, sort_keys=False).replace("nodes:\n", "nodes: [\n", 1))


# (id, make(path, good cluster dict), expected substring, expected ClusterError fields)
CLUSTER_CASES = [
    ("cluster_unknown_field", _cluster(lambda c: c["nodes"][1].update(colour="red")),
     "unknown field 'colour'", {"field": "nodes[1].colour"}),
    ("cluster_duplicate_node", _cluster(lambda c: c["nodes"][2].update(name=c["nodes"][0]["name"])),
     "duplicate node names 'node1' (also in nodes[0])", {"field": "nodes[2].name"}),
    ("cluster_broken_yaml", _broken_cluster, "invalid YAML: ", {"field": None}),
]
