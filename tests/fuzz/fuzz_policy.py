"""Coverage-guided fuzzing of policy files (DestinationRule and VirtualService YAML) and
of the same documents as Kubernetes objects.

    python tests/fuzz/fuzz_policy.py -runs=5000 [libFuzzer flags] [corpus dirs]

An input is the file's bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["modelxds"]):
    from tests.fuzz.checks import check_policy_objects, check_policy_text, load_yaml_objects


def one_input(data: bytes) -> None:
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return  # load_policy reports such a file as unreadable before parsing it
    check_policy_text(text)
    check_policy_objects(load_yaml_objects(text))


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
