"""KServe ModelMesh's etcd tables: keys and records."""

from modelxds.modelmesh.keys import (
    DEFAULT_ROOT_PREFIX,
    DEFAULT_SERVICE_NAME,
    Layout,
    Table,
    instance_id_from_pod_name,
    litelinks_item,
)
from modelxds.modelmesh.records import (
    PARSERS,
    InstanceRecord,
    LitelinksRecord,
    ModelRecord,
    Record,
    RecordError,
    VModelRecord,
    encode,
    parse_instance,
    parse_litelinks,
    parse_model,
    parse_vmodel,
)

__all__ = [
    "DEFAULT_ROOT_PREFIX",
    "DEFAULT_SERVICE_NAME",
    "PARSERS",
    "InstanceRecord",
    "Layout",
    "LitelinksRecord",
    "ModelRecord",
    "Record",
    "RecordError",
    "Table",
    "VModelRecord",
    "encode",
    "instance_id_from_pod_name",
    "litelinks_item",
    "parse_instance",
    "parse_litelinks",
    "parse_model",
    "parse_vmodel",
]
