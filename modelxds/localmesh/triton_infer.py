"""Run one KServe V2 gRPC inference with tritonclient and print the result as JSON.

A separate process: tritonclient's generated protos use the `inference` proto package,
as ours do, and two files defining the same symbols cannot share one descriptor pool.

    python -m modelxds.localmesh.triton_infer HOST:PORT MODEL [HEADER=VALUE ...]
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient

from modelxds.localmesh.train import SEED_INPUT


def main() -> None:
    url, model, *pairs = sys.argv[1:]
    headers = dict(p.split("=", 1) for p in pairs)
    client = grpcclient.InferenceServerClient(url)
    tensor = grpcclient.InferInput("predict", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.array([SEED_INPUT], dtype=np.float32))
    result = client.infer(model, [tensor], headers=headers, client_timeout=120)
    print(json.dumps({"predict": result.as_numpy("predict").tolist()}))


if __name__ == "__main__":
    main()
