"""Leader election on a coordination.k8s.io/v1 Lease, so that replicas never both patch.

`kubernetes.leaderelection` blocks (it sleeps between tries), so it runs in a thread of
its own; `may_patch()` is what the patching threads ask right before each request.
A replica leads from winning the Lease until a renewal fails or it stops; it then
stops patching at once, and a renewal older than ``renew_deadline`` also counts as
lost (the library would give up by then; others take over only after
``lease_duration``, which is longer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from kubernetes import client
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

from modelxds import metrics
from modelxds.labeler.labels import LabelerConfigError

log = logging.getLogger(__name__)

# client-go's defaults for controllers
LEASE_DURATION_S = 15
RENEW_DEADLINE_S = 10
RETRY_PERIOD_S = 2


def default_identity() -> str:
    """The pod's name when the Deployment passes it (POD_NAME), else host and process."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


class _Stopped(Exception):
    """Raised inside the election's loop to end it."""


class _Election(leaderelection.LeaderElection):  # type: ignore[misc]
    """The library's election, ended by ``stop`` at its next try, and reporting when a
    try last succeeded (we held the Lease then)."""

    def __init__(
        self, config: electionconfig.Config, stop: threading.Event, renewed: Callable[[], None]
    ) -> None:
        super().__init__(config)
        self._stop = stop
        self._renewed = renewed

    def try_acquire_or_renew(self) -> bool:
        if self._stop.is_set():
            raise _Stopped()
        held = bool(super().try_acquire_or_renew())
        if held:
            self._renewed()
        return held


class Leadership:
    """This replica's part in the election on Lease ``namespace/name``."""

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        name: str,
        namespace: str,
        identity: str,
        lease_duration: int = LEASE_DURATION_S,
        renew_deadline: float = RENEW_DEADLINE_S,
        retry_period: float = RETRY_PERIOD_S,
    ) -> None:
        # electionconfig.Config calls sys.exit() on bad values: refuse them here instead
        if not 1 <= retry_period * 1.2 < renew_deadline < lease_duration:
            raise LabelerConfigError(
                "leader election needs 1 <= retry period x 1.2 < renew deadline < lease "
                f"duration; got {retry_period}, {renew_deadline}, {lease_duration}"
            )
        if not name or not namespace:
            raise LabelerConfigError(f"lease name and namespace must be set: {namespace}/{name}")
        self.api_client = api_client
        self.name = name
        self.namespace = namespace
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self._leading = threading.Event()
        self._renewed_at = -float("inf")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._held = False  # led at some point: there may be a Lease of ours to hand back
        self._thread: threading.Thread | None = None
        self._on_change: Callable[[bool], None] = lambda leading: None

    def may_patch(self) -> bool:
        """Whether this replica holds the Lease now, with a renewal recent enough."""
        with self._lock:
            fresh = time.monotonic() - self._renewed_at < self.renew_deadline
            return self._leading.is_set() and fresh

    @property
    def leading(self) -> bool:
        return self._leading.is_set()

    def start(self, on_change: Callable[[bool], object]) -> None:
        """Campaign in a daemon thread; ``on_change(leading)`` runs on the running event
        loop (the caller's) whenever leadership starts or ends."""
        loop = asyncio.get_running_loop()

        def changed(leading: bool) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                loop.call_soon_threadsafe(on_change, leading)

        self._on_change = changed
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop campaigning (blocking, up to a retry period): stop patching, then hand
        the Lease back so another replica takes over at its next try."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.retry_period + 10 if timeout is None else timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            ended = threading.Event()
            lock = LeaseLock(self.name, self.namespace, self.identity)
            lock.api_instance = client.CoordinationV1Api(self.api_client)
            config = electionconfig.Config(
                lock,
                self.lease_duration,
                self.renew_deadline,
                self.retry_period,
                onstarted_leading=lambda ended=ended: self._set(True, ended),
                onstopped_leading=lambda ended=ended: self._set(False, ended),
            )
            try:
                _Election(config, self._stop, self._renewed).run()
            except _Stopped:
                pass
            except Exception as e:  # the API server unreachable, say: campaign again
                log.warning("lease %s/%s: %s", self.namespace, self.name, e)
            finally:
                self._set(False, ended)
            self._stop.wait(self.retry_period)
        self._release()

    def _renewed(self) -> None:
        with self._lock:
            self._renewed_at = time.monotonic()

    def _set(self, leading: bool, ended: threading.Event) -> None:
        with self._lock:
            if leading and ended.is_set():
                return  # the library started our callback after leadership was already lost
            if not leading:
                ended.set()
            if leading == self._leading.is_set():
                return
            if leading:
                self._leading.set()
                self._held = True
            else:
                self._leading.clear()
        metrics.LABELER_LEADER.set(1 if leading else 0)
        log.info(
            "%s %s lease %s/%s",
            self.identity,
            "holds" if leading else "no longer holds",
            self.namespace,
            self.name,
        )
        self._on_change(leading)

    def _release(self) -> None:
        """Clear the holder if it is us: the next candidate need not wait out the Lease."""
        if not self._held:
            return
        api = client.CoordinationV1Api(self.api_client)
        try:
            lease = api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = None
            api.replace_namespaced_lease(self.name, self.namespace, lease)
            log.info("%s released lease %s/%s", self.identity, self.namespace, self.name)
        except Exception as e:  # it expires by itself anyway
            log.info("lease %s/%s not released: %s", self.namespace, self.name, e)
