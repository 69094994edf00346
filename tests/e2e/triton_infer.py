"""Run one KServe V2 gRPC inference with tritonclient and print the result as JSON.

A separate process: tritonclient's generated protos use the `inference` proto package,
as ours do, and two files defining the same symbols cannot share one descriptor pool.

    python tests/e2e/triton_infer.py HOST:PORT MODEL [HEADER=VALUE ...]
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient

SEED_INPUT = [0, 0, 1, 11, 14, 15, 3, 0, 0, 1, 13, 16, 12, 16, 8, 0, 0, 8, 16, 4, 6, 16, 5, 0,
              0, 5, 15, 11, 13, 14, 0, 0, 0, 0, 2, 12, 16, 13, 0, 0, 0, 0, 0, 13, 16, 16, 6, 0,
              0, 0, 0, 16, 16, 16, 7, 0, 0, 0, 0, 11, 13, 12, 1, 0]  # fmt: skip


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
