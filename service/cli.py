"""`vaeserve serve` and `vaeserve client ...`. Module-level imports stay light (no grpc or
onnxruntime) so building --help is quick; each command imports what it runs."""

import argparse
import json
import os
import sys
from pathlib import Path

from vaeserve.errors import DataError
from vaeserve.service.settings import describe


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a model repository over gRPC",
        description="Serve every valid model version in a repository over gRPC (grpc.aio, ONNX Runtime, "
        "dynamic batching), with health, reflection and Prometheus metrics. Every flag has an environment "
        "variable; a flag wins over its variable.",
    )
    for name, env, default, doc, kind in describe():
        flag = "--" + name.replace("_", "-")
        serve.add_argument(flag, dest=name, type=kind, default=None, help=f"{doc} [{env}; default {default}]")
    serve.set_defaults(func=_serve)

    client = subparsers.add_parser(
        "client", help="call a running server",
        description="Call a vaeserve server. --tls or --ca turns TLS on, --cert/--key add a client certificate (mTLS), "
        "--token sends a bearer token; each has an environment variable, and a flag wins over its variable.",
    )  # fmt: skip
    commands = client.add_subparsers(dest="client_command", metavar="RPC", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default="localhost", help="server host (default localhost)")
    common.add_argument("--port", type=int, default=50051, help="server port (default 50051)")
    common.add_argument("--model", help="model name; may be left out when the server serves one model")
    common.add_argument("--version", type=int, default=0, help="model version (default: newest)")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    common.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    common.add_argument("--tls", action="store_true", help="TLS, the server's certificate checked against the "
                        "system's CA roots (implied by --ca, --cert and --key)")
    common.add_argument("--ca", metavar="FILE", default=_env("VAESERVE_CA"),
                        help="PEM CA bundle the server's certificate is checked against; turns TLS on [VAESERVE_CA]")
    common.add_argument("--cert", metavar="FILE", default=_env("VAESERVE_CLIENT_CERT"),
                        help="PEM client certificate chain, for a server that asks for one (mTLS) [VAESERVE_CLIENT_CERT]")
    common.add_argument("--key", metavar="FILE", default=_env("VAESERVE_CLIENT_KEY"),
                        help="PEM private key of --cert [VAESERVE_CLIENT_KEY]")
    common.add_argument("--token", default=_env("VAESERVE_TOKEN"),
                        help="bearer token sent with every call [VAESERVE_TOKEN]; on a shared machine set the "
                        "variable instead: other users can read a flag's value in the process list")  # fmt: skip
    labels = argparse.ArgumentParser(add_help=False)
    labels.add_argument("--labels", help="label names, comma-separated: one per row, or one for all rows")

    def rows_command(name, help, input_help="CSV or NPY file of raw rows"):
        p = commands.add_parser(name, help=help, parents=[common, labels])
        p.add_argument("input", type=Path, help=input_help)
        return p

    p = rows_command("embed", "posterior mean and log-variance of each row")
    p.add_argument("--samples", type=int, default=0, help="also draw this many posterior samples")
    p.add_argument("--seed", type=int)
    rows_command("reconstruct", "decoder mean at z = mu, with per-row reconstruction error")
    p = rows_command("score", "anomaly scores per row")
    p.add_argument("--threshold", type=float, help="override the manifest's threshold on neg_elbo")
    p.add_argument("--per-feature", action="store_true", help="also print per-feature scores")
    p.add_argument("--iw-samples", type=int, default=0, help="K of the importance-weighted score (0: none)")
    p = commands.add_parser("generate", help="sample rows from the model", parents=[common, labels])
    p.add_argument("--count", type=int, default=0, help="samples to draw (unconditional models)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    rows_command("decode", "decoder mean at latent points", "CSV or NPY file of latent rows z")
    commands.add_parser("models", help="list models, or show one with --model", parents=[common])
    client.set_defaults(func=_client)


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _serve(args) -> int:
    from vaeserve.service.server import serve
    from vaeserve.service.settings import Settings

    overrides = {name: getattr(args, name) for name, *_ in describe()}
    return serve(Settings.load(**overrides))


def read_rows(path: Path):
    """Rows from a .npy/.npz file, or a numeric CSV (a header line is skipped)."""
    import numpy as np

    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".npy":
        array = np.load(path)
    elif path.suffix == ".npz":
        with np.load(path) as data:
            array = data["x"] if "x" in data else data[data.files[0]]
    else:
        lines = path.read_text().splitlines()
        try:
            float(lines[0].split(",")[0])
            skip = 0
        except (ValueError, IndexError):
            skip = 1
        try:
            array = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2)
        except ValueError as err:
            raise DataError(f"{path}: not a numeric CSV ({err})") from None
    array = np.asarray(array, np.float32)
    return array.reshape(len(array), -1) if array.ndim != 2 else array


def _client(args) -> int:
    import grpc
    import numpy as np

    from vaeserve.service.client import Client

    with Client(f"{args.host}:{args.port}", timeout=args.timeout, ca=args.ca, cert=args.cert, key=args.key,
                token=args.token, tls=args.tls) as client:  # fmt: skip
        try:
            return _call(client, args, np)
        except grpc.RpcError as err:
            print(f"vaeserve client: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1


def _call(client, args, np) -> int:
    command = args.client_command
    if command == "models" and not args.model:
        _print({"models": client.models()}, args, table=lambda d: "\n".join(f"{n}\tversions {v}" for n, v in d["models"].items()))
        return 0
    model = args.model or _only_model(client)
    if command == "models":
        from google.protobuf.json_format import MessageToDict

        meta = MessageToDict(client.get_model(model, version=args.version))
        meta.pop("manifestJson", None)
        print(json.dumps(meta, indent=2))
        return 0
    x = read_rows(args.input) if hasattr(args, "input") else None
    labels = None
    if getattr(args, "labels", None):
        labels = args.labels.split(",")
        if x is not None and len(labels) == 1:
            labels = labels * len(x)
    if command == "embed":
        r = client.embed(model, x, labels, version=args.version, posterior_samples=args.samples, seed=args.seed)
        out = {"mu": r.mu, "logvar": r.logvar} | ({"samples": r.samples} if r.samples is not None else {})
        _print(out, args, columns=["mu", "logvar"])
    elif command == "reconstruct":
        r = client.reconstruct(model, x, labels, version=args.version)
        _print({"neg_log_likelihood": r.neg_log_likelihood, "mean_squared_error": r.mean_squared_error, "x": r.x},
               args, columns=["neg_log_likelihood", "mean_squared_error"])  # fmt: skip
    elif command == "score":
        r = client.score(model, x, labels, version=args.version, threshold=args.threshold,
                         per_feature=args.per_feature, iw_samples=args.iw_samples)  # fmt: skip
        out = {"neg_elbo": r.neg_elbo, "reconstruction": r.reconstruction, "kl": r.kl, "is_anomaly": r.is_anomaly,
               "out_of_support": r.out_of_support}  # fmt: skip
        if r.neg_iw is not None:
            out["neg_iw"] = r.neg_iw
        if r.per_feature is not None:
            out["per_feature"], out["support_distance"] = r.per_feature, r.support_distance
        _print(out | {"threshold": r.threshold}, args, columns=[k for k in out if k not in ("per_feature", "support_distance")])
    elif command == "generate":
        r = client.generate(model, args.count, labels, version=args.version, temperature=args.temperature, seed=args.seed)
        _print({"x": r.x, "z": r.z}, args, columns=["x"])
    elif command == "decode":
        _print({"x": client.decode(model, x, labels, version=args.version)}, args, columns=["x"])
    return 0


def _only_model(client) -> str:
    from vaeserve.errors import ConfigError

    models = client.models()
    if len(models) != 1:
        raise ConfigError(f"the server serves {sorted(models)}; name one with --model")
    return next(iter(models))


def _print(out: dict, args, columns=None, table=None) -> None:
    import numpy as np

    if args.json:
        print(json.dumps({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in out.items()}))
        return
    if table is not None:
        print(table(out))
        return
    for key, value in out.items():
        if key not in columns and not isinstance(value, np.ndarray):
            print(f"{key}: {value}")
    header, cells = ["row"], None
    for key in columns:
        value = np.asarray(out[key])
        value = value.reshape(len(value), -1)
        width = value.shape[1]
        shown = min(width, 8)
        header += [key] if width == 1 else [f"{key}[{i}]" for i in range(shown)] + (["..."] if width > shown else [])
        text = [[_fmt(v) for v in row[:shown]] + (["..."] if width > shown else []) for row in value]
        cells = text if cells is None else [a + b for a, b in zip(cells, text)]
    print("\t".join(header))
    for i, row in enumerate(cells):
        print("\t".join([str(i)] + row))


def _fmt(v) -> str:
    if isinstance(v, (bool,)) or getattr(v, "dtype", None) == bool:
        return "yes" if v else "no"
    return f"{float(v):.4g}"
