"""ModelMesh etcd records and keys, checked against the examples of DESIGN.md section 3."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelxds.modelmesh import (
    MAX_VALUE_BYTES,
    PARSERS,
    READERS,
    ROUTING_FIELDS,
    InstanceRecord,
    Layout,
    LitelinksRecord,
    ModelRecord,
    Parsed,
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
    read_instance,
    read_litelinks,
    read_model,
    read_vmodel,
)
from modelxds.placement.model import MeshPlacement, build_mesh

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
# Every InstanceRecord field DESIGN.md lists.
INSTANCE_EXAMPLE = json.dumps(
    {
        "startTime": 1715000000000,
        "vers": 1715000000000,
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
        version=1715000000000,
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
        actionable=True,
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
        (parse_model, '{"type":"mt:x","future":{"a":[1]},"fails":2}', ModelRecord("mt:x")),
        (parse_vmodel, '{"amid":"a","newField":[true]}', VModelRecord(active_model="a")),
        (parse_instance, '{"zone":"z","extra":null}', InstanceRecord(zone="z")),
        (
            parse_litelinks,
            '{"hostname":"10.0.0.9","instanceId":"i","weird":{"x":1}}',
            LitelinksRecord("10.0.0.9", "i"),
        ),
    ],
)
def test_unknown_fields_are_ignored(parse: Parser, raw: str, expected: Record) -> None:
    assert parse(raw) == expected


# ---- a wrong type in a routing field skips the record, with the field named ----

Reader = Callable[[bytes | str], Parsed[Record]]


@pytest.mark.parametrize(
    ("parse", "raw", "field"),
    [
        (parse_model, '{"instanceIds":["7dd689-4zwqs"]}', "instanceIds"),
        (parse_model, '{"instanceIds":"7dd689-4zwqs"}', "instanceIds"),
        (parse_model, '{"instanceIds":{"7dd689-4zwqs":"1715000000123"}}', "instanceIds"),
        (parse_model, '{"failedIn":{"a":1.5}}', "failedIn"),
        (parse_vmodel, '{"amid":["a"]}', "amid"),
        (parse_vmodel, '{"tmid":5}', "tmid"),
        (parse_vmodel, '{"failed":"true"}', "failed"),
        (parse_instance, '{"startTime":"1715000000000"}', "startTime"),
        (parse_instance, '{"shutdown":0}', "shutdown"),
        (parse_litelinks, '{"hostname":["h"],"instanceId":"i"}', "hostname"),
        (parse_litelinks, '{"hostname":"10.0.0.9","instanceId":7}', "instanceId"),
    ],
)
def test_wrong_type_in_a_routing_field_skips_the_record_and_names_the_field(
    parse: Parser, raw: str, field: str
) -> None:
    assert field in error_of(parse, raw)


# ---- a wrong type elsewhere keeps the record: that field takes its default ----


@pytest.mark.parametrize(
    ("read", "raw", "field", "expected"),
    [
        (read_model, '{"lu":"1715003600789","refs":1}', "lu", ModelRecord(refs=1)),
        (read_model, '{"autoDel":1,"refs":1}', "autoDel", ModelRecord(refs=1)),
        (read_model, '{"refs":true,"mPath":"p"}', "refs", ModelRecord(model_path="p")),
        (read_model, '{"type":7,"refs":1}', "type", ModelRecord(refs=1)),
        (read_model, '{"lul":[1],"refs":1}', "lul", ModelRecord(refs=1)),
        (read_vmodel, '{"o":{"x":1},"amid":"a"}', "o", VModelRecord(active_model="a")),
        (read_instance, '{"vers":"abc","startTime":5}', "vers", InstanceRecord(start_time=5)),
        (read_instance, '{"labels":"mt:sklearn","count":2}', "labels", InstanceRecord(count=2)),
        (read_instance, '{"labels":[1],"count":2}', "labels", InstanceRecord(count=2)),
        (read_instance, '{"cap":"big","zone":"z"}', "cap", InstanceRecord(zone="z")),
        (read_instance, '{"actionable":"y","zone":"z"}', "actionable", InstanceRecord(zone="z")),
        (
            read_litelinks,
            '{"hostname":"10.0.0.9","instanceId":"i","port":"8080"}',
            "port",
            LitelinksRecord("10.0.0.9", "i"),
        ),
        (
            read_litelinks,
            '{"hostname":"10.0.0.9","instanceId":"i","connConfig":[]}',
            "connConfig",
            LitelinksRecord("10.0.0.9", "i"),
        ),
        (
            read_litelinks,
            '{"hostname":"10.0.0.9","instanceId":"i","connConfig":{"a":1}}',
            "connConfig",
            LitelinksRecord("10.0.0.9", "i"),
        ),
    ],
)
def test_wrong_type_in_another_field_keeps_the_record_and_reports_the_field(
    read: Reader, raw: str, field: str, expected: Record
) -> None:
    got = read(raw)
    assert got.record == expected
    assert len(got.problems) == 1
    assert f"field {field!r}" in got.problems[0]


def test_ignored_field_problem_reads_like_an_operator_message() -> None:
    got = read_instance('{"vers":"abc","startTime":1715000000001}')
    assert got.problems == ("field 'vers': expected an integer, got str \"abc\"",)
    assert got.record.version == 0
    assert got.record.start_time == 1715000000001
    # the simple parser keeps working and gives just the record
    assert parse_instance('{"vers":"abc","startTime":1715000000001}') == got.record


def test_every_bad_non_routing_field_is_reported() -> None:
    got = read_model('{"refs":"1","lu":true,"instanceIds":{"a":5}}')
    assert dict(got.record.instance_ids) == {"a": 5}
    assert [p.split(":")[0] for p in got.problems] == ["field 'refs'", "field 'lu'"]


def test_clean_records_report_no_problems() -> None:
    for read, raw in [
        (read_model, MODEL_EXAMPLE),
        (read_vmodel, VMODEL_EXAMPLE),
        (read_instance, INSTANCE_EXAMPLE),
        (read_litelinks, LITELINKS_EXAMPLE),
    ]:
        assert read(raw).problems == ()


def test_readers_by_table_match_the_parsers() -> None:
    for table, raw in [
        (Table.REGISTRY, MODEL_EXAMPLE),
        (Table.VMODELS, VMODEL_EXAMPLE),
        (Table.INSTANCES, INSTANCE_EXAMPLE),
        (Table.LITELINKS, LITELINKS_EXAMPLE),
    ]:
        assert READERS[table](raw) == Parsed(PARSERS[table](raw), ())


def test_routing_fields_are_the_ones_design_names() -> None:
    assert ROUTING_FIELDS[ModelRecord] == {"instanceIds", "failedIn"}
    assert ROUTING_FIELDS[VModelRecord] == {"amid", "tmid", "failed"}
    assert ROUTING_FIELDS[InstanceRecord] == {"startTime", "shutdown"}
    assert ROUTING_FIELDS[LitelinksRecord] == {"hostname", "instanceId"}


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
        (LitelinksRecord("10.0.0.9", "i"), parse_litelinks),
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
    assert fields(LitelinksRecord("10.0.0.9", "i")) == {"hostname": "10.0.0.9", "instanceId": "i"}


def test_encode_keeps_non_defaults() -> None:
    doc = json.loads(encode(InstanceRecord(shutdown=True, labels=("mt:x",), count=1)))
    assert doc == {"shutdown": True, "labels": ["mt:x"], "count": 1}
    doc = json.loads(encode(ModelRecord(type="mt:x", instance_ids={"a": 1}, auto_delete=True)))
    assert doc == {"type": "mt:x", "instanceIds": {"a": 1}, "autoDel": True}


# ---- records as ModelMesh's Jackson writes them, routed ----

LIVE_POD, GONE_POD, EMPTY_POD = "7dd689-4zwqs", "7dd689-k2x9p", "87f6fc-6rwf9"
MODEL_ID = "example-mnist-isvc__isvc-6b2eb0b8bf"
ISVC = "example-mnist-isvc"
LONG_MAX = 9223372036854775807  # Java Long.MAX_VALUE: ModelMesh's lruTime of an empty cache
# DESIGN.md section 3's instance example, verbatim
DESIGN_INSTANCE_EXAMPLE = (
    '{"startTime":1715000000001,"vers":1715000000001,"loc":"10.0.0.12",'
    '"labels":["mt:sklearn","rt:mlserver-1.x"],'
    '"actionable":true,"lruTime":1715000000500,"count":2,"cap":393216,"used":12000,'
    '"lThreads":1,"rpm":37}'
)
# Each table as Jackson (NON_NULL + NON_DEFAULT) writes it: numbers as numbers, zeros,
# false and empty maps left out, and fields of a later ModelMesh we do not read.
JACKSON_TABLES: dict[Table, dict[str, str]] = {
    Table.REGISTRY: {
        MODEL_ID: MODEL_EXAMPLE,
        "failing-model": (
            '{"type":"mt:sklearn","mPath":"sklearn/broken.joblib",'
            '"failedIn":{"7dd689-4zwqs":1715000100000},'
            '"fails":{"7dd689-4zwqs":{"msg":"ModelLoadException: bad pickle"}},'
            '"refs":1,"lul":1715000200000,"actionable":true,"cacheHints":{"pin":[1,2]}}'
        ),
    },
    Table.VMODELS: {ISVC: VMODEL_EXAMPLE},
    Table.INSTANCES: {
        LIVE_POD: DESIGN_INSTANCE_EXAMPLE,
        GONE_POD: (
            '{"startTime":1715000300000,"vers":1715000300000,"loc":"10.0.0.13",'
            '"labels":["mt:sklearn","rt:mlserver-1.x"],"lruTime":1715000360456,"count":1,'
            '"cap":393216,"used":8000,"shutdown":true,"actionable":true}'
        ),
        EMPTY_POD: (
            '{"startTime":1668758388000,"vers":1668758388000,"loc":"10.0.0.14",'
            '"zone":"eu-west-1b","labels":["mt:sklearn","rt:mlserver-1.x"],'
            f'"lruTime":{LONG_MAX},"cap":393216,"lThreads":2,"reqsPerMinuteV2":0}}'
        ),
    },
    Table.LITELINKS: {
        "100.96.35.150_8080_18489c040ad": LITELINKS_EXAMPLE,  # EMPTY_POD's registration
        "100.96.35.151_8080_18f5b1d4e01": (
            '{"hostname":"100.96.35.151","instanceId":"7dd689-4zwqs","port":8080,'
            '"version":"20220721-36830","registrationTime":1715000000001,'
            '"connConfig":{"service.class":"com.ibm.watson.modelmesh.thrift.ModelMeshService"}}'
        ),
        # a pod that is shutting down is still registered until its lease goes
        "100.96.35.152_8080_18f5b22b9e0": (
            '{"hostname":"100.96.35.152","instanceId":"7dd689-k2x9p","port":8080,'
            '"version":"20220721-36830","registrationTime":1715000300000}'
        ),
    },
}
JACKSON_NOW_MS = 1715003600789 + 60_000


def jackson_records() -> dict[Table, dict[str, Any]]:
    out: dict[Table, dict[str, Any]] = {}
    for table, rows in JACKSON_TABLES.items():
        out[table] = {}
        for item, raw in rows.items():
            got = READERS[table](raw.encode())
            assert got.problems == (), (item, got.problems)
            out[table][item] = got.record
    return out


def mesh_of(records: dict[Table, dict[str, Any]]) -> MeshPlacement:
    return build_mesh(
        "modelmesh-serving",
        records[Table.REGISTRY],
        records[Table.VMODELS],
        records[Table.INSTANCES],
        records[Table.LITELINKS],
        JACKSON_NOW_MS,
    )


def test_records_as_modelmesh_writes_them_route_to_the_live_pod_only() -> None:
    records = jackson_records()
    mesh = mesh_of(records)
    assert set(mesh.instances) == {LIVE_POD, EMPTY_POD}  # the shut-down pod is not live
    assert mesh.routable(MODEL_ID) == (LIVE_POD,)
    assert mesh.models[MODEL_ID].dead == (GONE_POD,)
    assert mesh.routable(ISVC) == (LIVE_POD,)
    assert mesh.routable("failing-model") == ()
    assert mesh.models["failing-model"].failed == (LIVE_POD,)
    live = mesh.instances[LIVE_POD]
    assert (live.host, live.model_count, live.rpm, live.capacity) == (
        "100.96.35.151",
        2,
        37,
        393216,
    )
    empty = mesh.instances[EMPTY_POD]
    assert (empty.host, empty.zone, empty.lru_time) == ("100.96.35.150", "eu-west-1b", LONG_MAX)
    assert records[Table.INSTANCES][LIVE_POD].version == 1715000000001


def test_shutdown_true_takes_the_pod_out_like_a_deleted_record() -> None:
    records = jackson_records()
    gone = records[Table.INSTANCES][GONE_POD]
    assert gone.shutdown is True
    # the same pod without `shutdown` would be routed to: the flag alone removes it
    records[Table.INSTANCES][GONE_POD] = dataclasses.replace(gone, shutdown=False)
    assert mesh_of(records).routable(MODEL_ID) == (LIVE_POD, GONE_POD)
    del records[Table.INSTANCES][GONE_POD]
    deleted = mesh_of(records)
    records[Table.INSTANCES][GONE_POD] = gone
    shut_down = mesh_of(records)
    assert shut_down.routable(MODEL_ID) == deleted.routable(MODEL_ID) == (LIVE_POD,)
    assert shut_down.instances == deleted.instances
    assert shut_down.models == deleted.models


@pytest.mark.parametrize(
    ("table", "raw"),
    [
        (Table.REGISTRY, MODEL_EXAMPLE),
        (Table.VMODELS, VMODEL_EXAMPLE),
        (Table.INSTANCES, DESIGN_INSTANCE_EXAMPLE),
        (Table.INSTANCES, JACKSON_TABLES[Table.INSTANCES][GONE_POD]),
        (Table.LITELINKS, LITELINKS_EXAMPLE),
    ],
)
def test_encode_writes_what_modelmesh_writes(table: Table, raw: str) -> None:
    assert json.loads(encode(PARSERS[table](raw))) == json.loads(raw)


def test_encode_writes_longs_as_json_numbers_that_read_back() -> None:
    record = InstanceRecord(start_time=1715000000001, version=1715000000001, lru_time=LONG_MAX)
    raw = encode(record)
    assert raw == (
        b'{"startTime":1715000000001,"vers":1715000000001,"lruTime":9223372036854775807}'
    )
    assert read_instance(raw) == Parsed(record, ())


def test_a_model_on_thousands_of_pods_is_read_whole_and_a_bad_entry_is_named() -> None:
    ids = {f"pod-{i:05d}": 1715000000000 + i for i in range(20_000)}
    raw = json.dumps({"instanceIds": ids, "failedIn": {"pod-00001": 1}})
    got = read_model(raw)
    assert got.problems == ()
    assert dict(got.record.instance_ids) == ids
    bad = raw.replace('"pod-12345": 1715000012345', '"pod-12345": ' + "7" * 5000)
    assert error_of(parse_model, bad) == (
        "field 'instanceIds': entry \"pod-12345\": expected an integer, got a 5000-digit number"
    )


# ---- hostile values: a skipped record with a reason, never another exception ----

DEEP_ARRAY = b"[" * 100_000
DEEP_OBJECT = b'{"a":' * 100_000
DIGITS_5000 = b"1" * 5000


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (DEEP_ARRAY, "nested too deeply"),
        (DEEP_OBJECT, "nested too deeply"),
        (DEEP_ARRAY + b"]" * 100_000, "nested too deeply"),  # deep and well-formed
        (b'{"instanceIds":' + DEEP_ARRAY, "nested too deeply"),
        (b'{"mPath":' + DEEP_OBJECT, "nested too deeply"),  # in any field, known or not
        (b'{"instanceIds":{"a":' + DIGITS_5000 + b"}}", "5000-digit number"),
        (b'{"failedIn":{"a":-' + DIGITS_5000 + b"}}", "5000-digit number"),
        (b'{"instanceIds":{"a":1.7e12}}', "got float"),
        (b'{"instanceIds":{"a":1e400}}', "got float"),
        (b'{"instanceIds":{"a":true}}', "got bool"),
        (b'{"instanceIds":{"a":9223372036854775808}}', "Java long"),
        (b'{"instanceIds":{"a":-9223372036854775809}}', "Java long"),
        (b'{"instanceIds":{"a":NaN}}', "NaN"),
        (b'{"lu":Infinity}', "Infinity"),  # not JSON at all: skipped whatever the field
        (b'{"instanceIds":{"a":-Infinity}}', "-Infinity"),
        (b"\xff\xfe{\x00}\x00", "UTF-8"),
        (b'{"mPath":"\xc3\x28"}', "UTF-8"),
        (b'{"mPath":"\xed\xa0\x80"}', "UTF-8"),  # an encoded surrogate is not UTF-8 either
        (b'{"instanceIds":{"\\ud800":1}}', "surrogate"),
        (b" " * (MAX_VALUE_BYTES + 1), "limit"),
    ],
)
def test_hostile_registry_value_is_skipped_with_a_reason(raw: bytes, why: str) -> None:
    assert why in error_of(parse_model, raw)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b'{"startTime":' + DIGITS_5000 + b"}", "5000-digit number"),
        (b'{"startTime":1.7e12}', "got float"),
        (b'{"startTime":true}', "got bool"),
        (b'{"shutdown":1}', "got int"),
        (b'{"startTime":' + DEEP_ARRAY, "nested too deeply"),
    ],
)
def test_hostile_instance_value_is_skipped_with_a_reason(raw: bytes, why: str) -> None:
    assert why in error_of(parse_instance, raw)


@pytest.mark.parametrize(
    ("read", "raw", "why"),
    [
        (read_instance, b'{"startTime":5,"vers":' + DIGITS_5000 + b"}", "5000-digit number"),
        (read_instance, b'{"startTime":5,"vers":1.7e12}', "got float 1700000000000.0"),
        (read_instance, b'{"startTime":5,"cap":99999999999999999999}', "Java long"),
        (read_instance, b'{"startTime":5,"count":2147483648}', "Java int"),
        (read_instance, b'{"startTime":5,"rpm":false}', "got bool false"),
        (read_instance, b'{"startTime":5,"zone":"\\udc00"}', "surrogate"),
        (read_model, b'{"instanceIds":{"a":1},"lu":-' + DIGITS_5000 + b"}", "5000-digit number"),
        (read_model, b'{"instanceIds":{"a":1},"refs":1.0}', "got float"),
    ],
)
def test_hostile_value_in_another_field_keeps_the_record(
    read: Reader, raw: bytes, why: str
) -> None:
    got = read(raw)
    assert len(got.problems) == 1
    assert why in got.problems[0]


def test_any_java_long_is_a_timestamp_even_negative_or_absurd_but_no_more() -> None:
    rec = parse_model(b'{"instanceIds":{"a":-1,"b":9223372036854775807},"lu":-5}')
    assert dict(rec.instance_ids) == {"a": -1, "b": LONG_MAX}
    assert parse_instance(b'{"startTime":-9223372036854775808}').start_time == -(2**63)
    assert "Java long" in error_of(parse_instance, b'{"startTime":9223372036854775808}')


def test_values_above_the_size_limit_are_skipped_and_below_it_read() -> None:
    raw = b'{"mPath":"p"}'
    assert parse_model(raw.ljust(MAX_VALUE_BYTES)).model_path == "p"
    assert "limit" in error_of(parse_model, raw.ljust(MAX_VALUE_BYTES + 1))


def test_lone_surrogate_escapes_are_refused_and_valid_escapes_kept() -> None:
    rec = parse_model(b'{"mPath":"\\ud83d\\ude00 \\\\ud800","instanceIds":{"\\u00e9":1}}')
    assert rec.model_path == "\U0001f600 \\ud800"  # a pair, and an escaped backslash
    assert dict(rec.instance_ids) == {"\u00e9": 1}
    assert "surrogate" in error_of(parse_model, b'{"instanceIds":{"\\ud83d":1}}')
    assert "surrogate" in error_of(parse_litelinks, b'{"hostname":"\\ude00","instanceId":"i"}')


def test_problem_messages_stay_short_for_huge_values() -> None:
    huge = json.dumps({"startTime": 1, "zone": list(range(100_000)), "cap": "9" * 1_000_000})
    got = read_instance(huge)
    assert got.record == InstanceRecord(start_time=1)
    assert len(got.problems) == 2
    assert all(len(p) < 120 for p in got.problems), got.problems
    huge_entry = json.dumps({"instanceIds": {"a": "1" * 1_000_000}})
    assert len(error_of(parse_model, huge_entry)) < 120


# ---- properties: nothing but RecordError, whatever etcd holds ----

READERS_ALL: tuple[Reader, ...] = (read_model, read_vmodel, read_instance, read_litelinks)
FIELD_NAMES = sorted(
    {
        "type", "mPath", "encKey", "instanceIds", "failedIn", "fails", "refs", "autoDel",
        "lu", "lul", "actionable", "o", "amid", "tmid", "failed", "startTime", "vers",
        "loc", "zone", "labels", "lruTime", "count", "cap", "used", "lThreads", "lInProg",
        "rpm", "shutdown", "hostname", "instanceId", "port", "version", "registrationTime",
        "connConfig",
    }
)  # fmt: skip


class RawJSON(str):
    """JSON text put into a document as it is: tokens json.dumps would never write."""


def to_json(value: object) -> str:
    if isinstance(value, RawJSON):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(to_json, value)) + "]"
    return json.dumps(value)  # NaN and Infinity included


HOSTILE_TOKENS = st.sampled_from(
    [
        "1" * 5000,
        "-" + "1" * 5000,
        "1.7e12",
        "1e400",
        "-0",
        "9223372036854775808",
        "-9223372036854775809",
        "9223372036854775807",
        "2147483648",
        '"\\ud800"',
        '"x\\udc00"',
        '"\\ud83d\\ude00"',
        "[" * 3000 + "]" * 3000,
    ]
).map(RawJSON)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | HOSTILE_TOKENS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.sampled_from(FIELD_NAMES), inner, max_size=4)
    ),
    max_leaves=20,
)
RECORD_LIKE = st.dictionaries(
    st.sampled_from(FIELD_NAMES) | st.text(max_size=6), JSON_VALUES, max_size=12
)


def check_reads_or_refuses(raw: bytes) -> list[Parsed[Record]]:
    read: list[Parsed[Record]] = []
    for reader in READERS_ALL:
        with contextlib.suppress(RecordError):
            read.append(reader(raw))
    return read


HOSTILE_PREFIXES = st.sampled_from(
    [b"", b"[" * 100_000, b'{"a":' * 100_000, b'{"lu":NaN,', b'{"refs":' + b"1" * 5000, b"\xff"]
)


@settings(max_examples=300, deadline=None)
@given(HOSTILE_PREFIXES, st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_record_error(prefix: bytes, raw: bytes) -> None:
    check_reads_or_refuses(prefix + raw)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_arbitrary_json_never_raises_anything_but_record_error(value: object) -> None:
    check_reads_or_refuses(to_json(value).encode())


@settings(max_examples=500, deadline=None)
@given(RECORD_LIKE)
def test_anything_read_is_well_typed_and_survives_encode(doc: dict[str, object]) -> None:
    for got in check_reads_or_refuses(to_json(doc).encode()):
        record = got.record
        routing = ROUTING_FIELDS[type(record)]
        for problem in got.problems:
            name = problem.split("'")[1]
            assert name not in routing, problem  # a bad routing field is never just ignored
        for f in dataclasses.fields(record):
            value = getattr(record, f.name)
            if isinstance(value, bool | int):
                default = f.default if f.default is not dataclasses.MISSING else 0
                assert type(value) is type(default), (f.name, value)
                if type(value) is int:
                    assert -(2**63) <= value < 2**63
            elif isinstance(value, str):
                value.encode()  # real text: protobuf and logs can encode it
            elif isinstance(value, tuple):
                assert all(type(x) is str for x in value)
            else:
                assert isinstance(value, Mapping)
                assert all(type(x) in (int, str) and type(x) is not bool for x in value.values())
        # and what we write back is ModelMesh-shaped and reads as the same record
        again = READERS[TABLE_OF[type(record)]](encode(record))
        assert again == Parsed(record, ())


TABLE_OF: dict[type, Table] = {
    ModelRecord: Table.REGISTRY,
    VModelRecord: Table.VMODELS,
    InstanceRecord: Table.INSTANCES,
    LitelinksRecord: Table.LITELINKS,
}


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


@pytest.mark.parametrize(
    ("hostname", "address"),
    [
        ("100.96.35.150", "100.96.35.150"),
        ("fd00::1", "fd00::1"),
        ("[FD00:0:0::0001]", "fd00::1"),  # bracketed and long-hand: one spelling per pod
    ],
)
def test_pod_address_is_the_registered_ip_normalized(hostname: str, address: str) -> None:
    record = parse_litelinks(json.dumps({"hostname": hostname, "instanceId": "7dd689-4zwqs"}))
    assert record.hostname == address


@pytest.mark.parametrize("hostname", ["pod-0.modelmesh-serving.svc", "localhost", "10.0.0.300"])
def test_a_host_name_is_no_pod_address_and_skips_the_registration(hostname: str) -> None:
    with pytest.raises(RecordError, match=r"field 'hostname'.*not an IP address"):
        parse_litelinks(json.dumps({"hostname": hostname, "instanceId": "7dd689-4zwqs"}))


@pytest.mark.parametrize("hostname", ["fe80::1%eth0", "0.0.0.0", "::", "224.0.0.1", "ff02::1"])
def test_an_address_envoy_rejects_or_no_pod_has_skips_the_registration(hostname: str) -> None:
    with pytest.raises(RecordError, match=r"field 'hostname'"):
        parse_litelinks(json.dumps({"hostname": hostname, "instanceId": "7dd689-4zwqs"}))
