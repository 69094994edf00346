"""Coverage-guided fuzzing of InferenceService files as `modelxds mesh apply` reads them.

    python tests/fuzz/fuzz_isvc.py -runs=5000 [libFuzzer flags] [corpus dirs]

An input is the file's bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["modelxds"]):
    from tests.fuzz.checks import check_isvc_text


def one_input(data: bytes) -> None:
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return  # Path.read_text refuses it before parsing
    check_isvc_text(text)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
