"""ModelMesh etcd records and keys, checked against the examples of DESIGN.md section 3."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from modelxds.modelmesh import (
    PARSERS,
    InstanceRecord,
    Layout,
    LitelinksRecord,
    ModelRecord,
    Record,
    RecordError,
    Table,
    VModelRecord,
    encode,
    instance_id_from_pod_name,
    litelinks_item,
    parse_instance,
    parse_litelinks,
    parse_model,
    parse_vmodel,
)

# ---- the examples of DESIGN.md section 3, verbatim ----

MODEL_EXAMPLE = (
    '{"type":"rt:mlserver-1.x","mPath":"sklearn/mnist-svm.joblib","autoDel":true,'
    '"instanceIds":{"7dd689-4zwqs":1715000000123,"7dd689-k2x9p":1715000360456},'
    '"refs":1,"lu":1715003600789}'
)
LITELINKS_EXAMPLE = (
    '{"hostname":"100.96.35.150","instanceId":"87f6fc-6rwf9","port":8080,'
    '"version":"20220721-36830","registrationTime":1668758388909,'
    '"connConfig":{"service.class":"com.ibm.watson.modelmesh.thrift.ModelMeshService"}}'
)
VMODEL_EXAMPLE = (
    '{"o":"isvc","amid":"example-mnist-isvc__isvc-6b2eb0b8bf",'
    '"tmid":"example-mnist-isvc__isvc-6b2eb0b8bf"}'
)
# Every InstanceRecord field DESIGN.md lists, `actionable` included (we do not model it).
INSTANCE_EXAMPLE = json.dumps(
    {
        "startTime": 1715000000000,
        "vers": "20220721-36830",
        "loc": "10.0.0.7",
        "zone": "eu-west-1a",
        "labels": ["mt:sklearn", "rt:mlserver-1.x"],
        "lruTime": 1714990000000,
        "count": 3,
        "cap": 131072,
        "used": 4096,
        "lThreads": 2,
        "lInProg": 1,
        "rpm": 120,
        "shutdown": True,
        "actionable": True,
    }
)

Parser = Callable[[bytes | str], Record]


def error_of(parse: Parser, raw: bytes | str) -> str:
    with pytest.raises(RecordError) as info:
        parse(raw)
    return str(info.value)


# ---- parsing the documented examples ----


def test_model_record_example() -> None:
    rec = parse_model(MODEL_EXAMPLE)
    assert rec == ModelRecord(
        type="rt:mlserver-1.x",
        model_path="sklearn/mnist-svm.joblib",
        auto_delete=True,
        instance_ids={"7dd689-4zwqs": 1715000000123, "7dd689-k2x9p": 1715000360456},
        refs=1,
        last_used=1715003600789,
    )
    assert dict(rec.instance_ids) == {
        "7dd689-4zwqs": 1715000000123,
        "7dd689-k2x9p": 1715000360456,
    }
    assert dict(rec.failed_in) == {}
    assert rec.encryption_key == ""


def test_model_record_accepts_bytes() -> None:
    assert parse_model(MODEL_EXAMPLE.encode()) == parse_model(MODEL_EXAMPLE)


def test_model_record_failed_in_and_enc_key() -> None:
    rec = parse_model('{"type":"mt:sklearn","encKey":"k1","failedIn":{"7dd689-4zwqs":17}}')
    assert rec.type == "mt:sklearn"
    assert rec.encryption_key == "k1"
    assert dict(rec.failed_in) == {"7dd689-4zwqs": 17}


def test_litelinks_example() -> None:
    rec = parse_litelinks(LITELINKS_EXAMPLE)
    assert rec == LitelinksRecord(
        hostname="100.96.35.150",
        instance_id="87f6fc-6rwf9",
        port=8080,
        version="20220721-36830",
        registration_time=1668758388909,
        conn_config={"service.class": "com.ibm.watson.modelmesh.thrift.ModelMeshService"},
    )


def test_vmodel_example() -> None:
    rec = parse_vmodel(VMODEL_EXAMPLE)
    assert rec == VModelRecord(
        owner="isvc",
        active_model="example-mnist-isvc__isvc-6b2eb0b8bf",
        target_model="example-mnist-isvc__isvc-6b2eb0b8bf",
        target_failed=False,
    )
    assert parse_vmodel('{"amid":"a","tmid":"b","failed":true}').target_failed is True


def test_instance_record_with_every_field() -> None:
    rec = parse_instance(INSTANCE_EXAMPLE)
    assert rec == InstanceRecord(
        start_time=1715000000000,
        version="20220721-36830",
        location="10.0.0.7",
        zone="eu-west-1a",
        labels=("mt:sklearn", "rt:mlserver-1.x"),
        lru_time=1714990000000,
        count=3,
        capacity=131072,
        used=4096,
        load_threads=2,
        loads_in_progress=1,
        rpm=120,
        shutdown=True,
    )


def test_parsers_by_table() -> None:
    assert PARSERS[Table.REGISTRY](MODEL_EXAMPLE) == parse_model(MODEL_EXAMPLE)
    assert PARSERS[Table.VMODELS](VMODEL_EXAMPLE) == parse_vmodel(VMODEL_EXAMPLE)
    assert PARSERS[Table.INSTANCES](INSTANCE_EXAMPLE) == parse_instance(INSTANCE_EXAMPLE)
    assert PARSERS[Table.LITELINKS](LITELINKS_EXAMPLE) == parse_litelinks(LITELINKS_EXAMPLE)


# ---- absent means default (Jackson NON_NULL + NON_DEFAULT) ----


def test_empty_object_is_a_default_model_record() -> None:
    rec = parse_model("{}")
    assert rec.type == "NLCLASSIFIER"
    assert rec.model_path == ""
    assert rec.encryption_key == ""
    assert dict(rec.instance_ids) == {}
    assert dict(rec.failed_in) == {}
    assert rec.refs == 0
    assert rec.auto_delete is False
    assert rec.last_used == 0


def test_empty_object_is_a_default_vmodel_and_instance() -> None:
    assert parse_vmodel("{}") == VModelRecord("", "", "", False)
    inst = parse_instance("{}")
    assert inst == InstanceRecord()
    assert inst.labels == ()
    assert inst.shutdown is False
    assert inst.start_time == 0


def test_null_fields_mean_default() -> None:
    rec = parse_model('{"type":null,"instanceIds":null,"refs":null,"autoDel":null}')
    assert rec == ModelRecord()
    assert rec.type == "NLCLASSIFIER"


@pytest.mark.parametrize(
    ("parse", "raw", "expected"),
    [
        (parse_model, '{"type":"mt:x","future":{"a":[1]},"lul":5,"fails":2}', ModelRecord("mt:x")),
        (parse_vmodel, '{"amid":"a","newField":[true]}', VModelRecord(active_model="a")),
        (parse_instance, '{"zone":"z","actionable":true,"extra":null}', InstanceRecord(zone="z")),
        (
            parse_litelinks,
            '{"hostname":"h","instanceId":"i","weird":{"x":1}}',
            LitelinksRecord("h", "i"),
        ),
    ],
)
def test_unknown_fields_are_ignored(parse: Parser, raw: str, expected: Record) -> None:
    assert parse(raw) == expected


# ---- garbage is an error that says where ----


@pytest.mark.parametrize(
    ("parse", "raw", "field"),
    [
        (parse_model, '{"instanceIds":["7dd689-4zwqs"]}', "instanceIds"),
        (parse_model, '{"instanceIds":"7dd689-4zwqs"}', "instanceIds"),
        (parse_model, '{"instanceIds":{"7dd689-4zwqs":"1715000000123"}}', "instanceIds"),
        (parse_model, '{"failedIn":{"a":1.5}}', "failedIn"),
        (parse_model, '{"lu":"1715003600789"}', "lu"),
        (parse_model, '{"autoDel":1}', "autoDel"),
        (parse_model, '{"refs":true}', "refs"),
        (parse_model, '{"type":7}', "type"),
        (parse_vmodel, '{"amid":["a"]}', "amid"),
        (parse_vmodel, '{"failed":"true"}', "failed"),
        (parse_instance, '{"startTime":"1715000000000"}', "startTime"),
        (parse_instance, '{"labels":"mt:sklearn"}', "labels"),
        (parse_instance, '{"labels":[1]}', "labels"),
        (parse_instance, '{"shutdown":0}', "shutdown"),
        (parse_litelinks, '{"hostname":"h","instanceId":"i","port":"8080"}', "port"),
        (parse_litelinks, '{"hostname":"h","instanceId":"i","connConfig":[]}', "connConfig"),
    ],
)
def test_wrong_type_names_the_field(parse: Parser, raw: str, field: str) -> None:
    assert field in error_of(parse, raw)


@pytest.mark.parametrize("parse", [parse_model, parse_vmodel, parse_instance, parse_litelinks])
@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b'["a"]',
        b'"a string"',
        b"42",
        b"null",
        b"{not json",
        b"",
        b'{"type":"\xff\xfe"}',  # invalid UTF-8
    ],
)
def test_not_a_json_object_is_a_record_error(parse: Parser, raw: bytes) -> None:
    assert error_of(parse, raw)  # a RecordError with a message, not a crash


def test_json_array_and_invalid_json_messages() -> None:
    assert "object" in error_of(parse_model, "[]")
    assert "JSON" in error_of(parse_model, "{not json")
    assert "JSON" in error_of(parse_model, b'{"type":"\xff"}')


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"instanceId":"87f6fc-6rwf9","port":8080}', "hostname"),
        ('{"hostname":"","instanceId":"87f6fc-6rwf9"}', "hostname"),
        ('{"hostname":"100.96.35.150","port":8080}', "instanceId"),
        ('{"hostname":"100.96.35.150","instanceId":""}', "instanceId"),
        ('{"hostname":"100.96.35.150","instanceId":null}', "instanceId"),
    ],
)
def test_litelinks_without_hostname_or_instance_id(raw: str, field: str) -> None:
    # The message must name the etcd (JSON) field, as an operator reads it in etcdctl.
    assert field in error_of(parse_litelinks, raw)


# ---- encode: what ModelMesh would write ----


@pytest.mark.parametrize(
    ("parse", "raw"),
    [
        (parse_model, MODEL_EXAMPLE),
        (parse_litelinks, LITELINKS_EXAMPLE),
        (parse_vmodel, VMODEL_EXAMPLE),
    ],
)
def test_encode_reproduces_the_examples(parse: Parser, raw: str) -> None:
    assert json.loads(encode(parse(raw))) == json.loads(raw)


@pytest.mark.parametrize(
    ("record", "parse"),
    [
        (parse_model(MODEL_EXAMPLE), parse_model),
        (ModelRecord(), parse_model),
        (ModelRecord(failed_in={"a": 5}, encryption_key="k", refs=2), parse_model),
        (parse_vmodel(VMODEL_EXAMPLE), parse_vmodel),
        (VModelRecord(active_model="a", target_model="b", target_failed=True), parse_vmodel),
        (VModelRecord(), parse_vmodel),
        (parse_instance(INSTANCE_EXAMPLE), parse_instance),
        (InstanceRecord(), parse_instance),
        (parse_litelinks(LITELINKS_EXAMPLE), parse_litelinks),
        (LitelinksRecord("h", "i"), parse_litelinks),
    ],
)
def test_encode_round_trips(record: Record, parse: Parser) -> None:
    assert parse(encode(record)) == record


def test_encode_omits_defaults() -> None:
    def fields(record: Record) -> dict[str, Any]:
        doc = json.loads(encode(record))
        assert isinstance(doc, dict)
        return doc

    assert fields(VModelRecord()) == {}
    assert fields(InstanceRecord()) == {}
    assert fields(InstanceRecord(start_time=5, shutdown=False, labels=())) == {"startTime": 5}
    assert fields(VModelRecord(owner="isvc", target_failed=False)) == {"o": "isvc"}
    model = fields(ModelRecord(model_path="p", instance_ids={}, refs=0, auto_delete=False))
    # `type` may be written out; nothing that is empty, 0 or false may be
    assert set(model) - {"type"} == {"mPath"}
    assert fields(LitelinksRecord("h", "i")) == {"hostname": "h", "instanceId": "i"}


def test_encode_keeps_non_defaults() -> None:
    doc = json.loads(encode(InstanceRecord(shutdown=True, labels=("mt:x",), count=1)))
    assert doc == {"shutdown": True, "labels": ["mt:x"], "count": 1}
    doc = json.loads(encode(ModelRecord(type="mt:x", instance_ids={"a": 1}, auto_delete=True)))
    assert doc == {"type": "mt:x", "instanceIds": {"a": 1}, "autoDel": True}


# ---- keys ----

RP = "modelmesh-serving"
MM = f"{RP}/mm/modelmesh-serving"
LL = f"{RP}/litelinks/modelmesh-serving"
TEAM_A_MM = f"{RP}/mm_ns/team-a/mm/modelmesh-serving"
TEAM_A_LL = f"{RP}/mm_ns/team-a/litelinks/modelmesh-serving"
LL_ITEM = "100.96.35.150_8080_18489c040ad"


def test_default_layout_keys() -> None:
    layout = Layout()
    assert layout.key(Table.REGISTRY, "m1") == f"{MM}/registry/m1"
    assert layout.key(Table.VMODELS, "v1") == f"{MM}/vmodels/v1"
    assert layout.key(Table.INSTANCES, "7dd689-4zwqs") == f"{MM}/instances/7dd689-4zwqs"
    assert layout.key(Table.LITELINKS, LL_ITEM) == f"{LL}/{LL_ITEM}"
    assert layout.watch_prefixes() == (f"{MM}/", f"{LL}/")


def test_namespace_layout_keys() -> None:
    layout = Layout.for_namespace("team-a")
    assert layout.key(Table.REGISTRY, "m1") == f"{TEAM_A_MM}/registry/m1"
    assert layout.key(Table.INSTANCES, "i") == f"{TEAM_A_MM}/instances/i"
    assert layout.key(Table.LITELINKS, LL_ITEM) == f"{TEAM_A_LL}/{LL_ITEM}"
    assert layout.namespace("modelmesh-serving") == "team-a"


def test_namespace_of_a_plain_root_prefix_is_the_default() -> None:
    assert Layout().namespace("ctrl-ns") == "ctrl-ns"
    assert Layout("my-root").namespace("ctrl-ns") == "ctrl-ns"


def test_custom_root_and_service() -> None:
    layout = Layout.for_namespace("team-b", root_prefix="rp/", service_name="svc")
    assert layout.key(Table.REGISTRY, "m") == "rp/mm_ns/team-b/mm/svc/registry/m"
    assert layout.namespace("x") == "team-b"
    # a trailing slash on the root prefix must not produce "//" keys
    assert Layout("rp/").key(Table.REGISTRY, "m") == "rp/mm/modelmesh-serving/registry/m"


@pytest.mark.parametrize(
    "kwargs",
    [{"root_prefix": ""}, {"root_prefix": "/"}, {"service_name": ""}, {"service_name": "a/b"}],
)
def test_invalid_layouts_are_rejected(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        Layout(**kwargs)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (f"{MM}/registry/m1", (Table.REGISTRY, "m1")),
        (f"{MM}/registry/mnist__isvc-6b2eb0b8bf", (Table.REGISTRY, "mnist__isvc-6b2eb0b8bf")),
        (f"{MM}/vmodels/v1", (Table.VMODELS, "v1")),
        (f"{MM}/instances/7dd689-4zwqs", (Table.INSTANCES, "7dd689-4zwqs")),
        (f"{LL}/{LL_ITEM}", (Table.LITELINKS, LL_ITEM)),
    ],
)
def test_parse_key_tables(key: str, expected: tuple[Table, str]) -> None:
    assert Layout().parse_key(key) == expected


@pytest.mark.parametrize(
    "key",
    [
        f"{MM}/leaderLatch/_7dd689-4zwqs",
        f"{MM}/somethingElse/x",
        # another service
        f"{RP}/mm/other-svc/registry/m1",
        f"{RP}/mm/modelmesh-serving-2/registry/m1",
        f"{RP}/litelinks/other-svc/{LL_ITEM}",
        f"{RP}/litelinks/modelmesh-serving-2/{LL_ITEM}",
        # another namespace: the default layout must not claim these
        f"{TEAM_A_MM}/registry/m1",
        f"{TEAM_A_MM}/instances/7dd689-4zwqs",
        f"{TEAM_A_LL}/{LL_ITEM}",
        # another root prefix
        "other-root/mm/modelmesh-serving/registry/m1",
        # nested or empty items, table without an item
        f"{MM}/registry/a/b",
        f"{MM}/registry/",
        f"{MM}/registry",
        f"{MM}/",
        f"{LL}/",
        "",
    ],
)
def test_parse_key_ignores_keys_we_do_not_read(key: str) -> None:
    assert Layout().parse_key(key) is None


def test_namespace_layout_parses_its_own_keys_only() -> None:
    team_a = Layout.for_namespace("team-a")
    assert team_a.parse_key(f"{TEAM_A_MM}/registry/m1") == (Table.REGISTRY, "m1")
    assert team_a.parse_key(f"{TEAM_A_LL}/{LL_ITEM}") == (Table.LITELINKS, LL_ITEM)
    assert team_a.parse_key(f"{MM}/registry/m1") is None
    assert team_a.parse_key(f"{LL}/{LL_ITEM}") is None
    assert team_a.parse_key(f"{RP}/mm_ns/team-b/mm/modelmesh-serving/registry/m1") is None
    assert team_a.parse_key(f"{TEAM_A_MM}/leaderLatch/_x") is None


@pytest.mark.parametrize("table", list(Table))
def test_key_and_parse_key_agree(table: Table) -> None:
    for layout in (Layout(), Layout.for_namespace("team-a"), Layout("r", "svc", "kv")):
        assert layout.parse_key(layout.key(table, "item-1")) == (table, "item-1")


def test_instance_id_from_pod_name() -> None:
    assert instance_id_from_pod_name("modelmesh-serving-mlserver-1.x-658b7dd689-4zwqs") == (
        "7dd689-4zwqs"
    )
    assert instance_id_from_pod_name("short") == "short"


def test_litelinks_item() -> None:
    assert litelinks_item("100.96.35.150", 8080, 1668758388909) == LL_ITEM
    item = litelinks_item("10.0.0.1", 8080, 255)
    assert item == "10.0.0.1_8080_ff"
    assert Layout().parse_key(Layout().key(Table.LITELINKS, item)) == (Table.LITELINKS, item)
