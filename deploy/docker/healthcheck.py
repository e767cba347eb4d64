"""Container health check: asks the server's grpc.health.v1 service about the whole server ("").

Exit 0 when SERVING (models loaded and warmed up), 1 otherwise: NOT_SERVING while draining, or no answer.
The port comes from VAESERVE_PORT, as it does for the server. Used by the Dockerfile's HEALTHCHECK.
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    target = "127.0.0.1:" + os.environ.get("VAESERVE_PORT", "50051")
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        except grpc.RpcError as err:
            print(f"{target}: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
