"""Where ModelMesh keeps its tables in etcd.

Key layout (kserve/modelmesh with the litelinks service registry):

    RP/mm/SVC/registry/<modelId>        ModelRecord          persistent
    RP/mm/SVC/vmodels/<vmodelId>        VModelRecord         persistent
    RP/mm/SVC/instances/<instanceId>    InstanceRecord       pod lease
    RP/litelinks/SVC/<host>_<port>_<ms> litelinks record     pod lease
    RP/mm/SVC/leaderLatch/_<id>         leader election      lease

RP is the root prefix from the ``model-serving-etcd`` secret; the controller
puts namespaces other than its own under ``RP/mm_ns/<namespace>``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

DEFAULT_ROOT_PREFIX = "modelmesh-serving"
DEFAULT_SERVICE_NAME = "modelmesh-serving"
DEFAULT_KV_PREFIX = "mm"
NAMESPACE_SEGMENT = "/mm_ns/"


class Table(enum.Enum):
    REGISTRY = "registry"
    VMODELS = "vmodels"
    INSTANCES = "instances"
    LITELINKS = "litelinks"


@dataclass(frozen=True, slots=True)
class Layout:
    """The etcd key layout of one ModelMesh deployment (one namespace)."""

    root_prefix: str = DEFAULT_ROOT_PREFIX
    service_name: str = DEFAULT_SERVICE_NAME
    kv_prefix: str = DEFAULT_KV_PREFIX

    def __post_init__(self) -> None:
        # A trailing slash would make every key contain "//" and match nothing.
        if not self.root_prefix.strip("/"):
            raise ValueError(f"root prefix must not be empty: {self.root_prefix!r}")
        if not self.service_name or "/" in self.service_name:
            raise ValueError(f"service name must be a non-empty word: {self.service_name!r}")
        object.__setattr__(self, "root_prefix", self.root_prefix.rstrip("/"))

    @classmethod
    def for_namespace(
        cls, namespace: str, root_prefix: str = DEFAULT_ROOT_PREFIX, **kw: str
    ) -> Layout:
        """The layout the controller uses for a namespace other than its own."""
        return cls(f"{root_prefix.rstrip('/')}{NAMESPACE_SEGMENT}{namespace}", **kw)

    def namespace(self, default: str) -> str:
        """The Kubernetes namespace these pods run in (``default`` for the controller's own)."""
        _, sep, ns = self.root_prefix.rpartition(NAMESPACE_SEGMENT)
        return ns if sep and ns else default

    @property
    def mm_prefix(self) -> str:
        return f"{self.root_prefix}/{self.kv_prefix}/{self.service_name}/"

    @property
    def litelinks_prefix(self) -> str:
        return f"{self.root_prefix}/litelinks/{self.service_name}/"

    def table_prefix(self, table: Table) -> str:
        if table is Table.LITELINKS:
            return self.litelinks_prefix
        return f"{self.mm_prefix}{table.value}/"

    def watch_prefixes(self) -> tuple[str, str]:
        """The two key ranges that hold everything placement needs."""
        return (self.mm_prefix, self.litelinks_prefix)

    def key(self, table: Table, item: str) -> str:
        return self.table_prefix(table) + item

    def parse_key(self, key: str) -> tuple[Table, str] | None:
        """Which table and item a key belongs to; None for keys we do not read."""
        if key.startswith(self.litelinks_prefix):
            item = key[len(self.litelinks_prefix) :]
            return (Table.LITELINKS, item) if item and "/" not in item else None
        if not key.startswith(self.mm_prefix):
            return None
        table_name, sep, item = key[len(self.mm_prefix) :].partition("/")
        if not sep or not item or "/" in item:
            return None
        try:
            table = Table(table_name)
        except ValueError:
            return None  # leaderLatch and tables we do not need
        return table, item


def litelinks_item(host: str, port: int, registered_ms: int) -> str:
    """The litelinks key suffix for a registration: ``<host>_<port>_<hex ms>``."""
    return f"{host}_{port}_{registered_ms:x}"


def instance_id_from_pod_name(pod_name: str) -> str:
    """ModelMesh names an instance by the last 12 characters of its pod name."""
    return pod_name[-12:]
