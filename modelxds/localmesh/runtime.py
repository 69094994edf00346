"""One MLServer process: the model runtime a mesh node owns, as a ModelMesh pod owns its
runtime container. Loads and unloads through MLServer's model repository API."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc

from modelxds.kserve import grpc_predict_v2_pb2 as pb
from modelxds.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from modelxds.localmesh import processes

# model format (InferenceService spec.predictor.model.modelFormat.name) -> MLServer runtime
IMPLEMENTATIONS = {
    "sklearn": "mlserver_sklearn.SKLearnModel",
    "lightgbm": "mlserver_lightgbm.LightGBMModel",
}
MLSERVER_VENV = ".venv-mlserver"


class LoadError(RuntimeError):
    """The runtime could not load a model (missing file, wrong format, ...)."""


def mlserver_binary() -> str:
    """MODELXDS_MLSERVER, else ./.venv-mlserver (what `make run` builds), else PATH."""
    configured = os.environ.get("MODELXDS_MLSERVER")
    if configured:
        return configured
    local = Path.cwd() / MLSERVER_VENV / "bin" / "mlserver"
    if local.exists():
        return str(local)
    found = shutil.which("mlserver")
    if found is None:
        raise FileNotFoundError(
            f"mlserver not found: run `make setup-mlserver` (creates {MLSERVER_VENV}/) "
            "or set MODELXDS_MLSERVER"
        )
    return found


class MLServerRuntime:
    def __init__(self, host: str, http_port: int, grpc_port: int, workdir: Path) -> None:
        self.host = host
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.workdir = workdir
        self.repo = workdir / "repository"
        self.process: processes.Process | None = None
        self._channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.GRPCInferenceServiceStub | None = None

    def start(self, timeout: float = 60) -> None:
        self.repo.mkdir(parents=True, exist_ok=True)
        settings = {
            "host": self.host,
            "http_port": self.http_port,
            "grpc_port": self.grpc_port,
            "metrics_endpoint": None,
            # uvloop 0.23 breaks MLServer's worker pool; inference runs in-process
            "parallel_workers": 0,
            "load_models_at_startup": False,
            "model_repository_root": str(self.repo),
        }
        (self.workdir / "settings.json").write_text(json.dumps(settings))
        self.process = processes.spawn(
            "mlserver", [mlserver_binary(), "start", str(self.workdir)], self.workdir
        )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if not self.process.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"MLServer did not start:\n{self.process.log_tail()}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            return self._post_or_get("GET", "/v2/health/ready")[0] == 200
        except OSError:
            return False

    def _post_or_get(self, method: str, path: str) -> tuple[int, str]:
        req = urllib.request.Request(
            f"http://{self.host}:{self.http_port}{path}",
            method=method,
            data=b"" if method == "POST" else None,
        )
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    async def load(self, model_id: str, model_format: str, uri: Path) -> None:
        implementation = IMPLEMENTATIONS.get(model_format)
        if implementation is None:
            raise LoadError(
                f"no runtime for model format {model_format!r} "
                f"(supported: {', '.join(sorted(IMPLEMENTATIONS))})"
            )
        if not uri.exists():
            raise LoadError(f"model file {uri} does not exist")
        folder = self.repo / model_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": model_id,
                    "implementation": implementation,
                    "parameters": {"uri": str(uri)},
                }
            )
        )
        status, body = await asyncio.to_thread(
            self._post_or_get, "POST", f"/v2/repository/models/{model_id}/load"
        )
        if status != 200:
            shutil.rmtree(folder, ignore_errors=True)
            raise LoadError(f"MLServer could not load {model_id} from {uri}: {body.strip()}")

    async def unload(self, model_id: str) -> None:
        await asyncio.to_thread(
            self._post_or_get, "POST", f"/v2/repository/models/{model_id}/unload"
        )
        shutil.rmtree(self.repo / model_id, ignore_errors=True)

    def _stub(self) -> pb_grpc.GRPCInferenceServiceStub:
        if self.stub is None:  # made here, in the event loop: start() may run in a thread
            self._channel = grpc.aio.insecure_channel(f"{self.host}:{self.grpc_port}")
            self.stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        return self.stub

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        response: pb.ModelInferResponse = await self._stub().ModelInfer(request, timeout=300)
        return response

    async def metadata(self, model_id: str) -> pb.ModelMetadataResponse:
        """MLServer's metadata of a loaded model (its tensors, if its settings name them)."""
        response: pb.ModelMetadataResponse = await self._stub().ModelMetadata(
            pb.ModelMetadataRequest(name=model_id), timeout=30
        )
        return response

    async def stop(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        if self.process is not None:
            self.process.stop()
