"""Coverage-guided fuzzing of etcd keys and values as the placement watcher applies them.

    python tests/fuzz/fuzz_etcd.py -runs=5000 [libFuzzer flags] [corpus dirs]

An input is events separated by 0x1e; an event is ``KEY 0x1f VALUE`` (a put) or ``KEY``
alone (a delete). A key ``@<r|v|i|l><item>`` is the item's key in the registry, vmodels,
instances or litelinks table; any other key goes to etcd as it is.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["modelxds"]):
    from modelxds.modelmesh import Table
    from tests.fuzz.checks import LAYOUT, check_etcd_events

TABLES = {b"r": Table.REGISTRY, b"v": Table.VMODELS, b"i": Table.INSTANCES, b"l": Table.LITELINKS}


def events(data: bytes) -> list[tuple[bytes, bytes | None]]:
    out: list[tuple[bytes, bytes | None]] = []
    for event in data.split(b"\x1e")[:16]:
        key, put, value = event.partition(b"\x1f")
        table = TABLES.get(key[1:2]) if key.startswith(b"@") else None
        if table is not None:
            item = key[2:].decode("utf-8", "replace")
            key = LAYOUT.key(table, item).encode()
        out.append((key, value if put else None))
    return out


def one_input(data: bytes) -> None:
    check_etcd_events(events(data))


def main() -> None:
    logging.disable(logging.WARNING)  # every skipped record is a warning: millions of them
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
