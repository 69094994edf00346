"""modelxds: an xDS control plane that routes inference to the ModelMesh pod holding the model."""

import os

# modelxds starts etcd and Envoy as child processes (local stack, tests, benchmarks);
# gRPC's fork handlers have nothing to do for an exec'd child and only log noise.
# gRPC reads this when it loads, and every entry point imports this package first.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
