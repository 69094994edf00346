"""Run the seed's input through tritonclient.http against a KServe V2 REST endpoint and
print the answers as JSON: the ``predict`` output, ``is_model_ready`` and
``get_model_metadata``.

``binary_data=False`` on the input and the output: the request is the V2 REST JSON
``data`` form, not Triton's binary extension, which a ModelMesh REST proxy does not speak.
A separate process, as triton_infer.py, so a test's event loop never blocks on it.

    python -m modelxds.localmesh.triton_http HOST:PORT MODEL [HEADER=VALUE ...]
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.http as httpclient

from modelxds.localmesh.train import SEED_INPUT


def main() -> None:
    url, model, *pairs = sys.argv[1:]
    headers = dict(p.split("=", 1) for p in pairs)
    client = httpclient.InferenceServerClient(url, network_timeout=120)
    tensor = httpclient.InferInput("predict", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.array([SEED_INPUT], dtype=np.float32), binary_data=False)
    output = httpclient.InferRequestedOutput("predict", binary_data=False)
    result = client.infer(model, [tensor], outputs=[output], headers=headers)
    print(
        json.dumps(
            {
                "predict": result.as_numpy("predict").tolist(),
                "ready": client.is_model_ready(model, headers=headers),
                "metadata": client.get_model_metadata(model, headers=headers),
            }
        )
    )


if __name__ == "__main__":
    main()
