"""Triton python-backend model running one exported ONNX graph with ONNX Runtime (shared by every role).

Each role's ``1/model.py`` imports ``OrtModel`` from here. Tensor names come from the model's config.pbtxt,
which ``detseg export`` writes from the same graph, so inputs and outputs line up by name.

- ``initialize``: builds the ONNX Runtime session once per instance, on the instance's kind: KIND_GPU uses
  the CUDA execution provider on the instance's device, KIND_CPU the CPU provider. Config parameters:
  ``intra_op_threads`` (0 = ONNX Runtime's default), ``onnx_file`` (default ``model.onnx``).
- ``execute``: with dynamic batching (``max_batch_size`` > 0) the requests Triton hands over are stacked
  along the batch axis, run in ONE session call, and split back, so each caller gets its own rows. Requests
  whose other axes differ (an open-vocabulary detector's class count) are stacked per shape.
  Requests the client already cancelled (deadline passed) are answered CANCELLED without running.
  Models with ``max_batch_size`` 0 (the mask decoder: its first axis is the prompt count) run one by one.

Needs numpy<2 and onnxruntime (onnxruntime-gpu on GPU images) in the Python that runs the stub.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class OrtModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / params.get("onnx_file", "model.onnx")
        options = ort.SessionOptions()
        threads = int(params.get("intra_op_threads", "0"))
        if threads > 0:
            options.intra_op_num_threads = threads
        # ONNX Runtime's CPU arena keeps the peak activation memory of the largest batch for good. Measured, SAM 2
        # encoder at 1024² on 2 cores: a batch of 4 leaves 5.9 GB with it, 0.34 GB without (2.0 s/image either
        # way); at batch 8 the arena-less run is slower (3.6 vs 2.6 s/image), hence micro-batches of 4 by default.
        options.enable_cpu_mem_arena = False
        if args.get("model_instance_kind") == "GPU":
            device = int(args.get("model_instance_device_id", "0"))
            providers: list = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        live = []
        for n, request in enumerate(requests):
            if request.is_cancelled():
                responses[n] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("request cancelled", pb_utils.TritonError.CANCELLED)
                )
            else:
                live.append(n)
        if not self.batched:
            for n in live:
                responses[n] = self._run_one(requests[n])
            return responses
        groups: dict[tuple, list[int]] = {}
        for n in live:
            shapes = tuple(pb_utils.get_input_tensor_by_name(requests[n], i).as_numpy().shape[1:] for i in self.inputs)
            groups.setdefault(shapes, []).append(n)
        for slots in groups.values():
            if len(slots) == 1:
                responses[slots[0]] = self._run_one(requests[slots[0]])
            else:
                self._run_batched([requests[n] for n in slots], slots, responses)
        return responses

    def _feeds(self, request) -> dict[str, np.ndarray]:
        return {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}

    def _respond(self, arrays: list[np.ndarray]):
        tensors = [
            pb_utils.Tensor(name, np.ascontiguousarray(a)) for name, a in zip(self.outputs, arrays, strict=False)
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _run_one(self, request):
        try:
            return self._respond(self.session.run(self.outputs, self._feeds(request)))
        except Exception as e:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(e).__name__}: {e}"))

    def _run_batched(self, requests: list, slots: list[int], responses: list) -> None:
        try:
            feeds = [self._feeds(r) for r in requests]
            sizes = [len(f[self.inputs[0]]) for f in feeds]
            stacked = {name: np.concatenate([f[name] for f in feeds]) for name in self.inputs}
            outputs = self.session.run(self.outputs, stacked)
        except Exception:
            for n, r in zip(slots, requests, strict=False):
                responses[n] = self._run_one(r)
            return
        offsets = np.cumsum([0, *sizes])
        for n, start, stop in zip(slots, offsets[:-1], offsets[1:], strict=False):
            responses[n] = self._respond([o[start:stop] for o in outputs])

    def finalize(self) -> None:
        self.session = None
