"""KServe V2 inference API (``inference.GRPCInferenceService``) as spoken by ModelMesh pods.

The ``grpc_predict_v2*`` modules and ``grpc_predict_v2.pb`` are generated from
``proto/grpc_predict_v2.proto`` by ``proto/build.sh``; never edit them by hand.
"""

from functools import cache
from pathlib import Path

SERVICE_NAME = "inference.GRPCInferenceService"

# A filesystem path rather than an importlib.resources handle: Envoy's
# transcoder config can reference the file directly (wheels install as plain files).
DESCRIPTOR_SET_PATH = Path(__file__).with_name("grpc_predict_v2.pb")


@cache
def descriptor_set_bytes() -> bytes:
    """The serialized FileDescriptorSet (with imports) for inlining into Envoy config."""
    return DESCRIPTOR_SET_PATH.read_bytes()
