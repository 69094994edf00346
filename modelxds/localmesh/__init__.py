"""A ModelMesh-compatible mesh on one machine, for `make run`, tests and benchmarks."""

import os

# The local stack forks etcd and Envoy with a pre-exec hook; gRPC's fork handlers
# have nothing to do for an exec'd child and only log noise. Read when gRPC loads.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
