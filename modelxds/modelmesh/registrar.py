"""Write a pod's placement to etcd the way a ModelMesh pod does.

Used by the local mesh, the sample pods of `make run` and the end-to-end tests:
litelinks registration and InstanceRecord under the pod's lease (they vanish
with the pod), registry records updated with compare-and-swap on their
mod revision because every pod edits the same shared records.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from types import MappingProxyType

import aetcd

from modelxds.modelmesh.keys import Layout, Table, litelinks_item
from modelxds.modelmesh.records import (
    LONG_MAX,
    InstanceRecord,
    LitelinksRecord,
    ModelRecord,
    VModelRecord,
    encode,
    parse_model,
)

LITELINKS_PORT = 8080  # ModelMesh's internal Thrift port, as registered
THRIFT_SERVICE = "com.ibm.watson.modelmesh.thrift.ModelMeshService"
# The service version a pod registers in litelinks. In the NAME-YYYYMMDD-BUILD form of
# ModelMesh's builds, so that it yields a numeric `vers` as theirs do (numeric_version).
LOCALMESH_VERSION = "modelxds-localmesh-20240601-1"

_VERSION = re.compile(r".+-([0-9]{8})-([0-9]+)")
_OLD_VERSION = re.compile(r"([0-9]{8}-[0-9]{4})(?:-([0-9]+))?")


def now_ms() -> int:
    return int(time.time() * 1000)


def numeric_version(version: str) -> int:
    """The InstanceRecord ``vers`` ModelMesh derives from its service version string.

    It is not the start time: ModelMesh (``ModelMesh.initialize``) reads
    ``NAME-YYYYMMDD-BUILD`` as that day (UTC) in epoch ms plus BUILD, and the older
    ``YYYYMMDD-HHMM[-BUILD]`` as that minute plus BUILD. Any other string gives 0, which
    Jackson leaves out of the record.
    """
    for pattern, layout in ((_VERSION, "%Y%m%d"), (_OLD_VERSION, "%Y%m%d-%H%M")):
        m = pattern.fullmatch(version)
        if m is None:
            continue
        try:
            at = datetime.strptime(m.group(1), layout).replace(tzinfo=UTC)
        except ValueError:
            return 0  # a date that does not exist (month 13, say)
        return int(at.timestamp()) * 1000 + int(m.group(2) or 0)
    return 0


def etcd_client(url: str) -> aetcd.Client:
    host, _, port = url.removeprefix("http://").rstrip("/").rpartition(":")
    return aetcd.Client(host=host or "127.0.0.1", port=int(port))


async def update_model(
    client: aetcd.Client,
    layout: Layout,
    model_id: str,
    change: Callable[[ModelRecord | None], ModelRecord | None],
) -> ModelRecord | None:
    """Read-modify-write a registry record; retried until no other pod raced us."""
    key = layout.key(Table.REGISTRY, model_id).encode()
    while True:
        got = await client.get(key)
        current = parse_model(got.value) if got is not None else None
        updated = change(current)
        compare = (
            client.transactions.mod(key) == got.mod_revision
            if got is not None
            else client.transactions.create(key) == 0
        )
        op = (
            client.transactions.delete(key)
            if updated is None
            else client.transactions.put(key, encode(updated))
        )
        ok, _ = await client.transaction(compare=[compare], success=[op], failure=[])
        if ok:
            return updated


class ModelNotFound(LookupError):
    """No registry record for the model."""


async def claim_copy(
    client: aetcd.Client, layout: Layout, model_id: str, target: str, live: Collection[str]
) -> str:
    """Where ``model_id`` is (or now will be) loaded: a live copy if any, else ``target``.

    The claim is a compare-and-swap on the registry record, so when many requests miss
    at once on different pods, exactly one of them places the load; the others learn
    where it went and send their requests there.
    """
    key = layout.key(Table.REGISTRY, model_id).encode()
    while True:
        got = await client.get(key)
        if got is None:
            raise ModelNotFound(model_id)
        rec = parse_model(got.value)
        existing = sorted(i for i in rec.instance_ids if i in live and i not in rec.failed_in)
        if existing:
            return existing[0]
        claimed = with_copy(target, now_ms())(rec)
        ok, _ = await client.transaction(
            compare=[client.transactions.mod(key) == got.mod_revision],
            success=[client.transactions.put(key, encode(claimed))],
            failure=[],
        )
        if ok:
            return target


def with_copy(instance_id: str, started_ms: int) -> Callable[[ModelRecord | None], ModelRecord]:
    def change(rec: ModelRecord | None) -> ModelRecord:
        rec = rec or ModelRecord()
        ids = dict(rec.instance_ids, **{instance_id: started_ms})
        failed = {k: v for k, v in rec.failed_in.items() if k != instance_id}
        return replace(rec, instance_ids=MappingProxyType(ids), failed_in=MappingProxyType(failed))

    return change


def without_copy(instance_id: str) -> Callable[[ModelRecord | None], ModelRecord | None]:
    def change(rec: ModelRecord | None) -> ModelRecord | None:
        if rec is None:
            return None
        ids = {k: v for k, v in rec.instance_ids.items() if k != instance_id}
        return replace(rec, instance_ids=MappingProxyType(ids))

    return change


def failed_copy(instance_id: str, at_ms: int) -> Callable[[ModelRecord | None], ModelRecord]:
    def change(rec: ModelRecord | None) -> ModelRecord:
        rec = rec or ModelRecord()
        ids = {k: v for k, v in rec.instance_ids.items() if k != instance_id}
        failed = dict(rec.failed_in, **{instance_id: at_ms})
        return replace(rec, instance_ids=MappingProxyType(ids), failed_in=MappingProxyType(failed))

    return change


async def put_vmodel(
    client: aetcd.Client, layout: Layout, vmodel_id: str, record: VModelRecord
) -> None:
    await client.put(layout.key(Table.VMODELS, vmodel_id).encode(), encode(record))


class PodRegistration:
    """The leased records of one pod; gone from etcd when the pod stops renewing."""

    def __init__(
        self,
        client: aetcd.Client,
        layout: Layout,
        instance_id: str,
        host: str,
        *,
        ttl: int = 10,
        zone: str = "",
        capacity: int = 0,
        version: str = LOCALMESH_VERSION,
    ) -> None:
        self.client = client
        self.layout = layout
        self.instance_id = instance_id
        self.host = host
        self.ttl = ttl
        self.zone = zone
        self.capacity = capacity
        self.version = version  # litelinks service version
        self.started_ms = 0  # set by register()
        self.lease_id = 0
        self._keepalive: asyncio.Task[None] | None = None

    async def register(self) -> None:
        lease = await self.client.lease(self.ttl)
        self.lease_id = lease.id
        self.started_ms = started = now_ms()
        reg = LitelinksRecord(
            hostname=self.host,
            instance_id=self.instance_id,
            port=LITELINKS_PORT,
            version=self.version,
            registration_time=started,
            conn_config={"service.class": THRIFT_SERVICE},
        )
        item = litelinks_item(self.host, LITELINKS_PORT, started)
        await self.client.put(
            self.layout.key(Table.LITELINKS, item).encode(), encode(reg), lease=self.lease_id
        )
        await self.publish_instance()
        self._keepalive = asyncio.create_task(self._renew())

    def instance_record(
        self, last_used: Iterable[int] = (), *, loads_in_progress: int = 0
    ) -> InstanceRecord:
        """This pod's InstanceRecord as ModelMesh writes it; ``last_used`` holds the last-use
        time (epoch ms) of each model loaded here."""
        times = list(last_used)
        return InstanceRecord(
            start_time=self.started_ms,  # the pod's start: every update keeps it
            version=numeric_version(self.version),
            zone=self.zone,
            # ModelMesh writes Long.MAX_VALUE for an empty cache, not 0: readers that look
            # for the pod with the oldest models must not pick one that holds none
            lru_time=min(times, default=LONG_MAX),
            count=len(times),
            capacity=self.capacity,
            loads_in_progress=loads_in_progress,
        )

    async def publish_instance(
        self, last_used: Iterable[int] = (), *, loads_in_progress: int = 0
    ) -> None:
        await self.update_instance(
            self.instance_record(last_used, loads_in_progress=loads_in_progress)
        )

    async def update_instance(self, record: InstanceRecord) -> None:
        await self.client.put(
            self.layout.key(Table.INSTANCES, self.instance_id).encode(),
            encode(record),
            lease=self.lease_id,
        )

    async def add_copy(self, model_id: str, started_ms: int | None = None) -> None:
        """A load of ``model_id`` started here (``instanceIds`` entry)."""
        started = now_ms() if started_ms is None else started_ms
        await update_model(self.client, self.layout, model_id, with_copy(self.instance_id, started))

    async def remove_copy(self, model_id: str) -> None:
        await update_model(self.client, self.layout, model_id, without_copy(self.instance_id))

    async def fail_copy(self, model_id: str) -> None:
        await update_model(
            self.client, self.layout, model_id, failed_copy(self.instance_id, now_ms())
        )

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            with contextlib.suppress(Exception):  # a missed renewal is retried; expiry is real
                await self.client.refresh_lease(self.lease_id)

    async def stop(self, *, revoke: bool = True) -> None:
        """Stop renewing; ``revoke`` deletes the leased keys now (a clean shutdown)."""
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
            self._keepalive = None
        if revoke and self.lease_id:
            await self.client.revoke_lease(self.lease_id)
