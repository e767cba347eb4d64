"""Container health check: asks the server's grpc.health.v1 service about the whole server ("").

Exit 0 when SERVING (models loaded and warmed up), 1 otherwise: NOT_SERVING while draining, or no answer.
Used by the Dockerfile's HEALTHCHECK. It reads the server's own VAESERVE_* variables, so it follows how
the container was started; it dials 127.0.0.1, or VAESERVE_HOST when that names one address:

- VAESERVE_HEALTH_PORT set: that port, plaintext (it serves health only, whatever the main port speaks).
- Otherwise VAESERVE_PORT: plaintext without VAESERVE_TLS_CERT. With it, TLS, verifying the server's
  certificate against VAESERVE_HEALTHCHECK_CA when set, else against VAESERVE_TLS_CERT itself (which
  works for a self-signed certificate). The certificate must be valid for the address dialled, or for
  the name in VAESERVE_HEALTHCHECK_SERVER_NAME (e.g. the DNS name clients use).
- With VAESERVE_TLS_CLIENT_CA (mTLS) the main port wants a client certificate, which the check does not
  have: only the health port works, and without one the check fails, saying so.

Needs grpcio and grpcio-health-checking only.
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

WILDCARDS = {"", "[::]", "::", "0.0.0.0"}  # bind every interface: loopback reaches them


def channel(env) -> tuple[str, grpc.Channel]:
    """(target, channel) for the server the environment describes; ValueError when the check cannot reach it."""
    host = env.get("VAESERVE_HOST", "")
    host = "127.0.0.1" if host in WILDCARDS else host
    health_port = int(env.get("VAESERVE_HEALTH_PORT") or -1)
    if health_port == 0:
        raise ValueError("VAESERVE_HEALTH_PORT=0 picks a free port, which the check cannot know")
    if health_port > 0:
        target = f"{host}:{health_port}"
        return target, grpc.insecure_channel(target)
    target = f"{host}:{env.get('VAESERVE_PORT', '50051')}"
    cert = env.get("VAESERVE_TLS_CERT")
    if not cert:
        return target, grpc.insecure_channel(target)
    if env.get("VAESERVE_TLS_CLIENT_CA"):
        raise ValueError("the port requires client certificates (VAESERVE_TLS_CLIENT_CA): set VAESERVE_HEALTH_PORT")
    with open(env.get("VAESERVE_HEALTHCHECK_CA") or cert, "rb") as roots:
        credentials = grpc.ssl_channel_credentials(roots.read())
    name = env.get("VAESERVE_HEALTHCHECK_SERVER_NAME")
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return target, grpc.secure_channel(target, credentials, options=options)


def main(env=os.environ) -> int:
    try:
        target, health_channel = channel(env)
    except (ValueError, OSError) as err:
        print(f"health check: {err}", file=sys.stderr)
        return 1
    with health_channel:
        try:
            reply = health_pb2_grpc.HealthStub(health_channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError as err:
            print(f"{target}: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
