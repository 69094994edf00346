"""Coverage-guided fuzzing of requests at the endpoint picker: headers and gRPC bodies.

    python tests/fuzz/fuzz_picker.py -runs=5000 [libFuzzer flags] [corpus dirs]

An input is header lines ``name: value`` (repeats allowed; ``@hint: a,b`` is the
gateway's subset hint instead), an empty line, then the body, cut into the chunks the
gateway streams at each 0x1f.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["modelxds"]):
    from tests.fuzz.checks import check_exchange, picker_destination

DESTINATION = picker_destination({"m": "pod-1", "a.b*c+?(x|y)": "pod-2", "ü\x00\n": "pod-0"})


def request(data: bytes) -> tuple[list[tuple[str, bytes]], list[bytes], list[str]]:
    """An input's headers, body chunks and subset hint."""
    head, _, body = data.partition(b"\n\n")
    headers: list[tuple[str, bytes]] = []
    hint: list[str] = []
    for line in head.split(b"\n"):
        # a pseudo-header (":path") starts with the separator's colon
        name, _, value = line.partition(b": ")
        key = name.decode("utf-8", "replace").lower()
        if key == "@hint":
            hint = value.decode("utf-8", "replace").split(",")
        elif key:
            headers.append((key, value))
    chunks = body.split(b"\x1f") if body else []
    return headers, chunks, hint


def one_input(data: bytes) -> None:
    check_exchange(*request(data), DESTINATION)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
