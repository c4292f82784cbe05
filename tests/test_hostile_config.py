"""Property-based: any config file or override ends in a valid Config or one ConfigError line, never a crash."""
import dataclasses

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simclr.config import Config, ConfigError, load_config

KNOWN = [f.name for f in dataclasses.fields(Config)] + ["out_dim", "base_model", "s", "input_shape", "valid_size",
                                                         "temperature", "name", "lr", "num_workers"]
keys = st.one_of(st.sampled_from(KNOWN), st.text(max_size=12))
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                    st.sampled_from(["(96,96,3)", "10e-6", "None", "resnet18", "auto", "1e400", "-0", "0x10"]))
values = st.recursive(scalars, lambda children: st.one_of(st.lists(children, max_size=4),
                                                          st.dictionaries(keys, children, max_size=4)), max_leaves=12)
documents = st.dictionaries(keys, values, max_size=6)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def check(load) -> None:
    try:
        config = load()
    except ConfigError as err:
        message = str(err)
        # a message may quote the user's own key, which can be any text ("Traceback" too: hypothesis draws this
        # file's literals), so look for a traceback's header, not the word
        assert message and "\n" not in message and "Traceback (most recent call last)" not in message
        return
    assert isinstance(config, Config)


@SETTINGS
@given(documents)
def test_random_yaml_documents(tmp_path, document):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    check(lambda: load_config(path))


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    check(lambda: load_config(path))


@SETTINGS
@given(st.lists(st.tuples(st.text(max_size=20), st.text(max_size=20)), max_size=4))
def test_random_overrides(pairs):
    check(lambda: load_config(None, [f"{k}={v}" for k, v in pairs]))


@SETTINGS
@given(st.lists(st.text(max_size=30), max_size=4))
def test_random_override_strings(items):
    check(lambda: load_config(None, items))


HOSTILE = [
    "epochs: !!python/object/apply:os.system ['touch pwned']\n",
    "model: !!python/object:collections.OrderedDict {}\n",
    "a: &a [*a]\n",
    "base: &b {out_dim: 8}\nmodel: *b\n",
    "base: &b {out_dim: 8}\nmodel:\n  <<: *b\n  base_model: resnet50\n",
    "batch_size: !!int '12'\n",
    "batch_size: !!binary aGVsbG8=\n",
    "dataset: {input_shape: !!python/tuple [96, 96, 3]}\n",
    "? [1, 2]\n: 3\n",
    "- just\n- a list\n",
    "\ufeffbatch_size: 64\n",
    "epochs: 1e999\n",
    "batch_size: 99999999999999999999999\n",
    "loss: {temperature: .inf}\n",
    "x" * 10000 + ": 1\n",
    "[" * 5000 + "]" * 5000,
]


def test_hostile_documents(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for text in HOSTILE:
        path = tmp_path / "c.yaml"
        path.write_text(text, encoding="utf-8")
        check(lambda: load_config(path))
    path.write_bytes(b"epochs: \xff\xfe 3\n")
    check(lambda: load_config(path))
    assert not (tmp_path / "pwned").exists()


def test_anchor_merge_is_understood(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {out_dim: 8}\n")
    check(lambda: load_config(path))
    path.write_text("model: &m {out_dim: 8}\n")
    assert load_config(path).model.out_dim == 8
