"""The one loading path (egresscore.inputs, .files): every bad-file kind is
rejected whole, with the path, document, line and field."""
import os
import threading

import pytest
import yaml
from input_cases import CLUSTER_CASES, GOOD_POLICY, POLICY_CASES, policy_text

from egresscore.cluster import ClusterError
from egresscore.files import MAX_INPUT_BYTES, InputFileError, read_input_file
from egresscore.inputs import InputError, check_policies, load_inputs
from egresscore.policy import PolicyError, parse_policy

HERE = os.path.dirname(os.path.abspath(__file__))
CLUSTER = os.path.join(HERE, "..", "examples", "cluster.yaml")


def load_within(seconds, *args, **kw):
    """load_inputs on a thread: a FIFO must not make it wait."""
    box = {}

    def run():
        try:
            box["value"] = load_inputs(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "load_inputs blocked"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.parametrize("case", POLICY_CASES, ids=[c[0] for c in POLICY_CASES])
def test_each_bad_policy_file_is_rejected_whole_and_named(tmp_path, case):
    _, make, message, fields = case
    good, bad = tmp_path / "a-good.yaml", tmp_path / "b.yaml"
    good.write_text(policy_text({**yaml.safe_load(GOOD_POLICY), "metadata": {"name": "other"}}))
    bad.write_text(GOOD_POLICY)
    assert len(load_inputs(CLUSTER, [str(good), str(bad)]).policies) == 2
    make(str(bad))
    with pytest.raises(InputError) as info:
        load_within(10, CLUSTER, [str(good), str(bad)])
    (err,) = info.value.errors
    assert isinstance(err, PolicyError)
    assert err.file == str(bad) and message in str(err) and str(bad) in str(info.value)
    for name, value in fields.items():
        assert getattr(err, name) == value, name
    # the same file inside a folder: the folder is rejected whole too (a removed one just is not there)
    if case[0] == "removed":
        assert [p.name for p in load_within(10, policies=[str(tmp_path)]).policies] == ["other"]
        return
    with pytest.raises(InputError) as info:
        load_within(10, policies=[str(tmp_path)])
    assert [e.file for e in info.value.errors] == [str(bad)]


def test_a_file_removed_from_a_folder_removes_its_policies(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD_POLICY)
    (tmp_path / "b.yaml").write_text(policy_text({**yaml.safe_load(GOOD_POLICY), "metadata": {"name": "b"}}))
    assert sorted(p.name for p in load_inputs(policies=str(tmp_path)).policies) == ["b", "egress-sample"]
    os.unlink(tmp_path / "b.yaml")
    assert [p.name for p in load_inputs(policies=str(tmp_path)).policies] == ["egress-sample"]
    os.unlink(tmp_path / "a.yaml")
    assert load_inputs(policies=str(tmp_path)).policies == []       # an empty folder: no policies


def test_a_fifo_or_device_in_a_folder_is_named_not_waited_on(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD_POLICY)
    os.mkfifo(tmp_path / "pipe.yaml")
    os.symlink("/dev/zero", tmp_path / "zero.yml")
    with pytest.raises(InputError) as info:
        load_within(10, policies=[str(tmp_path)])
    assert [(e.file, e.message) for e in info.value.errors] == [
        (str(tmp_path / "pipe.yaml"), "not a regular file (a FIFO)"),
        (str(tmp_path / "zero.yml"), "not a regular file (a character device)"),
    ]
    assert str(info.value).endswith("(and 1 more problem)")


def test_symlinks_to_regular_files_are_fine_and_limits_are_bytes(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text(GOOD_POLICY)
    (tmp_path / "p.yaml").symlink_to(real)
    assert [p.name for p in load_inputs(policies=str(tmp_path / "p.yaml")).policies] == ["egress-sample"]
    exact = tmp_path / "exact"
    exact.write_bytes(b"#" * 100)
    assert read_input_file(exact, limit=100) == "#" * 100
    with pytest.raises(InputFileError, match="is 101 bytes, over the limit of 100 bytes"):
        exact.write_bytes(b"#" * 101)
        read_input_file(exact, limit=100)
    assert MAX_INPUT_BYTES == 4 << 20


def test_not_utf8_and_nesting_and_bad_list(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_bytes(GOOD_POLICY.encode() + b"# \xff\n")
    with pytest.raises(InputError, match=r"p.yaml: is not UTF-8 text \(line 19\)"):
        load_inputs(policies=str(p))
    p.write_text("# deep\n" + "[" * 100000 + "]" * 100000)    # libyaml's composer would crash on it
    # PyYAML 6.0.4's libyaml stops at its own depth limit first: either way a clean error, no crash
    with pytest.raises(InputError, match=r"document 1 \(line 1\): invalid YAML at line 2: "
                                         r"(nested deeper than 64|exceeded maximum nesting depth)"):
        load_inputs(policies=str(p))
    c = tmp_path / "c.yaml"
    c.write_text("nodes:\n" + "".join(" " * i + "- a:\n" for i in range(1, 200, 2)))
    with pytest.raises(InputError, match=r"c.yaml: line \d+: invalid YAML: nested deeper than 64 levels"):
        load_inputs(str(c))
    p.write_text("apiVersion: v1\nkind: List\nitems: {}\n")
    with pytest.raises(InputError, match=r"document 1 \(line 1\): items: must be a list, not a mapping"):
        load_inputs(policies=str(p))


def test_duplicate_names_reject_the_set(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD_POLICY)
    (tmp_path / "b.yaml").write_text(GOOD_POLICY)
    with pytest.raises(InputError) as info:
        load_inputs(policies=str(tmp_path))
    (err,) = info.value.errors
    assert err.file == str(tmp_path / "b.yaml") and err.path == "metadata.name" and "duplicate" in err.message
    p = parse_policy(yaml.safe_load(GOOD_POLICY))[0]
    assert check_policies([p]) == [p]
    with pytest.raises(InputError, match="duplicate policy name"):
        check_policies([p, p])
    with pytest.raises(InputError, match=r"policies\[0\] is dict"):
        check_policies([{"name": "x"}])


@pytest.fixture
def lab_cluster():
    with open(CLUSTER) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("case", CLUSTER_CASES, ids=[c[0] for c in CLUSTER_CASES])
def test_each_bad_cluster_file_is_named(tmp_path, lab_cluster, case):
    _, make, message, fields = case
    path = tmp_path / "cluster.yaml"
    make(str(path), lab_cluster)
    with pytest.raises(InputError) as info:
        load_inputs(str(path))
    (err,) = info.value.errors
    assert isinstance(err, ClusterError) and err.file == str(path) and message in str(err)
    assert err.line is not None and f"line {err.line}" in str(err)
    for name, value in fields.items():
        assert getattr(err, name) == value, name
    lines = path.read_text().splitlines()
    if err.field:                               # the line is the field's own line
        assert err.field.rsplit(".", 1)[-1].split("[")[0] in lines[err.line - 1]


@pytest.mark.parametrize("kind", ["empty", "removed", "fifo", "dev_zero"])
def test_bad_cluster_file_kinds(tmp_path, kind):
    path = tmp_path / "cluster.yaml"
    path.write_text("")
    make = dict((c[0], c[1]) for c in POLICY_CASES)[kind]
    make(str(path))
    with pytest.raises(InputError) as info:
        load_within(10, str(path))
    (err,) = info.value.errors
    assert isinstance(err, ClusterError) and err.file == str(path)
    assert {"empty": "no cluster document", "removed": "no such file", "fifo": "(a FIFO)",
            "dev_zero": "(a character device)"}[kind] in str(err)


def test_cluster_duplicates_pods_and_ips(tmp_path, lab_cluster):
    path = tmp_path / "c.yaml"
    lab_cluster["pods"].append(dict(lab_cluster["pods"][0], name="twin"))
    path.write_text(yaml.safe_dump(lab_cluster))
    with pytest.raises(InputError, match=r"pods\[2\]\.ips: duplicate pod IP '10\.0\.1\.93' \(also in pods\[0\]\)"):
        load_inputs(str(path))
    lab_cluster["pods"][2]["name"] = lab_cluster["pods"][0]["name"]
    path.write_text(yaml.safe_dump(lab_cluster))
    with pytest.raises(InputError, match=r"pods\[2\]\.name: duplicate pod 'default/app1'"):
        load_inputs(str(path))


def test_every_problem_is_listed_one_line_each(tmp_path, lab_cluster):
    cluster = tmp_path / "c.yaml"
    cluster.write_text("nodes: [\n")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.yaml").write_text("")
    (tmp_path / "p" / "b.yaml").write_text(GOOD_POLICY.replace("/24", "/33"))
    with pytest.raises(InputError) as info:
        load_inputs(str(cluster), [str(tmp_path / "p")])
    assert [type(e) for e in info.value.errors] == [ClusterError, PolicyError, PolicyError]
    assert "\n" not in str(info.value) and str(info.value).endswith("(and 2 more problems)")
