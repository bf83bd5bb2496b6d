"""A bare grpc.aio pass-through to one node: no validation, admission, routing or
failover. bench/coordinator.py runs it beside the coordinator so the table shows what
any Python gRPC hop costs apart from what the coordinator's own logic adds.

    python bench/bare_relay.py NODE_HOST:PORT     # prints the port it listens on
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from cluster.api import inference_pb2_grpc  # noqa: E402


class Passthrough(inference_pb2_grpc.InferenceServicer):
    def __init__(self, target: str):
        self._stub = inference_pb2_grpc.InferenceStub(grpc.aio.insecure_channel(target))

    async def Generate(self, request, context):
        async for chunk in self._stub.Generate(request, timeout=context.time_remaining()):
            yield chunk


async def main(target: str) -> None:
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(Passthrough(target), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
