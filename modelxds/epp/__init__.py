"""`modelxds epp`: an endpoint picker (Envoy ``ext_proc`` server) for the Gateway API
Inference Extension, choosing for each request a ModelMesh pod that holds its model.

Data flow: placement (the same watcher as ``serve``) -> ``pick`` (holders, then the
policy's fallback) -> ``server`` (the ext_proc stream: model from path, headers or the
gRPC body; the pick as header and ``envoy.lb`` metadata; every body chunk echoed).
"""
