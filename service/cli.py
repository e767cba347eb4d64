"""`vaeserve serve` and `vaeserve client ...`. Module-level imports stay light (no grpc or
onnxruntime) so building --help is quick; each command imports what it runs."""

import argparse
import os
import sys
from pathlib import Path

from vaeserve.errors import ConfigError, DataError
from vaeserve.service.settings import describe


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a model repository over gRPC",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the example keeps its lines; flags still wrap
        description="Serve every valid model version in a repository over gRPC (grpc.aio, ONNX\n"
        "Runtime, dynamic batching), with health, reflection and Prometheus metrics.\n"
        "Every flag has an environment variable; a flag wins over its variable.",
        epilog="""example:
  vaeserve serve --repository models --port 50051 --metrics-port 8000
  VAESERVE_REPOSITORY=models VAESERVE_WORKERS=4 vaeserve serve --host 0.0.0.0

Health says SERVING once every version is loaded and warmed up. SIGTERM or
Ctrl-C drains: NOT_SERVING for --drain-notice-seconds, then the calls in flight
finish within --drain-seconds, then exit 0. A port in use, or a repository
with no valid version: one line, exit status 2.""",
    )
    for name, env, default, doc, kind in describe():
        flag = "--" + name.replace("_", "-")
        serve.add_argument(flag, dest=name, type=kind, default=None, help=f"{doc} [{env}; default {default}]")
    serve.set_defaults(func=_serve)

    client = subparsers.add_parser(
        "client", help="call a running server", formatter_class=_Help,
        description="Call a vaeserve server: score, embed or reconstruct the rows of a CSV (columns matched to the "
        "model's feature names by header), generate, decode, or describe the models it serves. Any number of rows "
        "goes in one command: the client splits them within the server's limits. --tls or --ca turns TLS on, "
        "--cert/--key add a client certificate (mTLS), --token sends a bearer token; each has an environment "
        "variable, and a flag wins over its variable.",
        epilog=_examples(
            "vaeserve client models",
            "vaeserve client models --model digits",
            "vaeserve client score --model digits rows.csv",
            "vaeserve client score --model digits rows.csv --out scores.csv",
        ),
    )  # fmt: skip
    commands = client.add_subparsers(dest="client_command", metavar="RPC", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default="localhost", help="server host (default localhost)")
    common.add_argument("--port", type=int, default=50051, help="server port (default 50051)")
    common.add_argument("--model", help="model name; may be left out when the server serves one model")
    common.add_argument("--version", type=int, default=0, help="model version (default: newest)")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    common.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
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
    labels.add_argument("--labels", help="a CVAE's label names, comma-separated: one per row, or one for all rows")
    written = argparse.ArgumentParser(add_help=False)
    written.add_argument("--out", type=Path, metavar="FILE",
                         help="write one line per row to FILE (.csv with a header, or .jsonl) instead of printing")
    read = argparse.ArgumentParser(add_help=False)
    read.add_argument("--label-column", metavar="NAME",
                      help="the CSV column holding each row's label, for a CVAE (default: the column the model was "
                      "trained with, as its manifest records, else 'label'); an unconditional model skips it")  # fmt: skip

    def command(name, help, description, *examples, parents=(common,)):
        return commands.add_parser(name, help=help, description=description, epilog=_examples(*examples),
                                   parents=list(parents), formatter_class=_Help)  # fmt: skip

    def rows_command(name, help, description, *examples, input_help=ROWS_HELP):
        p = command(name, help, description, *examples, parents=(common, labels, read, written))
        p.add_argument("input", type=Path, help=input_help)
        return p

    p = rows_command("embed", "posterior mean and log-variance of each row",
                     "The posterior q(z|x) of each row: mu and logvar per latent dimension, and with --samples S, "
                     "S samples z of it per row (a second table).",
                     "vaeserve client embed --model digits rows.csv --samples 3 --seed 0")  # fmt: skip
    p.add_argument("--samples", type=int, default=0, metavar="S", help="also draw S posterior samples per row")
    p.add_argument("--seed", type=int, help="seed of the posterior samples (default: random)")
    rows_command("reconstruct", "decoder mean at z = mu, with per-row reconstruction error",
                 "The decoder mean at z = mu of each row, by feature name, with its neg_log_likelihood (nats) and "
                 "mean_squared_error (raw units).",
                 "vaeserve client reconstruct --model digits rows.csv --json")  # fmt: skip
    p = rows_command("score", "anomaly scores per row",
                     "Score each row: the model's anomaly_score (the score its threshold applies to: combined, or "
                     "neg_elbo) and its p_value, neg_elbo = reconstruction + kl (nats), knn_distance, is_anomaly "
                     "(anomaly_score over the threshold) and out_of_support. --alpha A flags at false-positive rate A "
                     "instead: the rows with p_value <= A. --out FILE writes every row with its top features by "
                     "per-feature score.",
                     "vaeserve client score --model digits rows.csv --per-feature",
                     "vaeserve client score --model digits rows.csv --alpha 0.01",
                     "vaeserve client score --model digits rows.csv --iw-samples 64 --out scores.jsonl")  # fmt: skip
    flag = p.add_mutually_exclusive_group()
    flag.add_argument("--threshold", type=float, help="override the manifest's threshold on the anomaly score")
    flag.add_argument("--alpha", type=float, metavar="A",
                      help="flag at false-positive rate A in (0, 1): rows with p_value <= A (versions with conformal "
                      "calibration; `client models --model M` shows the smallest A)")  # fmt: skip
    p.add_argument("--per-feature", action="store_true",
                   help="also show each row's top features (table), or every feature's score (--json)")
    p.add_argument("--top", type=int, default=3, metavar="K",
                   help="features named per row with --per-feature and in --out (default 3)")
    p.add_argument("--iw-samples", type=int, default=0, metavar="K",
                   help="also the K-sample importance-weighted score neg_iw (default 0: none)")
    p = command("generate", "sample rows from the model",
                "Decoder means at z ~ N(0, T^2 I): --count of them from an unconditional model, one per label of "
                "--labels from a CVAE.",
                "vaeserve client generate --model digits --count 4 --seed 0",
                "vaeserve client generate --model my-cvae --labels 3,3,7", parents=(common, labels, written))  # fmt: skip
    p.add_argument("--count", type=int, default=0, help="samples to draw (unconditional models)")
    p.add_argument("--temperature", type=float, metavar="T", help="scale of the latent prior, 0 <= T <= 100 (default 1)")
    p.add_argument("--seed", type=int, help="seed of the latent points (default: random)")
    rows_command("decode", "decoder mean at latent points",
                 "The decoder mean at each latent point z, by feature name. The file's columns are the latent "
                 "dimensions, in order.",
                 "vaeserve client decode --model digits z.csv", input_help="CSV or NPY file of latent rows z")  # fmt: skip
    command("models", "list models, or describe one with --model",
            "Every model the server serves with its versions; with --model, one version's summary: kind, features, "
            "labels, likelihood, threshold and how it was calibrated, its false-positive rates (target, the one the "
            "threshold holds, the smallest --alpha), quantiles, providers per graph, limits.",
            "vaeserve client models", "vaeserve client models --model digits --json")  # fmt: skip
    client.set_defaults(func=_client)


ROWS_HELP = ("CSV file of raw rows with a header naming the model's features (any order; a CVAE's labels in "
             "--label-column), or an NPY/NPZ file of rows in the model's feature order")  # fmt: skip


class _Help(argparse.HelpFormatter):
    """Descriptions wrapped to the terminal; the examples of an epilog one per line, as written."""

    def _fill_text(self, text, width, indent):
        if text.startswith("example"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _examples(*lines: str) -> str:
    return "example" + ("s" if len(lines) > 1 else "") + ":\n" + "\n".join(f"  {line}" for line in lines)


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _serve(args) -> int:
    from vaeserve.service.server import serve
    from vaeserve.service.settings import Settings

    overrides = {name: getattr(args, name) for name, *_ in describe()}
    return serve(Settings.load(**overrides))


def _client(args) -> int:
    from vaeserve.service.client import Client, ServerError

    try:
        with Client(f"{args.host}:{args.port}", timeout=args.timeout, ca=args.ca, cert=args.cert, key=args.key,
                    token=args.token, tls=args.tls) as client:  # fmt: skip
            try:
                code = _call(client, args)
            except ServerError as err:
                print(f"vaeserve client: {err.code().name}: {err}", file=sys.stderr)
                code = 1
        sys.stdout.flush()  # here, so that a closed pipe is caught below and not at exit
        return code
    except BrokenPipeError:  # `| head` stopped reading: nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _call(client, args) -> int:
    from vaeserve.service import output

    command = args.client_command
    if command == "models" and not args.model:
        models = client.models()
        print(output.dumps({"models": models}) if args.json else "\n".join(output.models_table(models)))
        return 0
    info = client.get_model(args.model or _only_model(client), version=args.version)
    if command == "models":
        print(output.dumps(output.model_dict(info)) if args.json else "\n".join(output.model_summary(info)))
        return 0
    output.check_out(args.out)
    names = info.feature_names or tuple(f"x[{i}]" for i in range(info.features))
    progress = output.Progress(f"vaeserve client {command}:")
    options = dict(version=info.version, progress=progress)  # the version whose feature names were read
    head = {"model": info.name, "version": info.version}
    try:
        if command == "generate":
            labels = _flag_labels(args.labels)
            labels = None if labels is None else _labels_per_row(labels, max(args.count, 1))
            r = client.generate(info.name, args.count, labels, temperature=args.temperature, seed=args.seed, **options)
            records = output.sample_records(r.x, names, r.z, labels)
        else:
            x, labels = _input(args, info, names, command)
            if command == "score":
                ask = args.per_feature or args.out is not None  # the top features need per-feature scores
                r = client.score(info.name, x, labels, threshold=args.threshold, alpha=args.alpha, per_feature=ask,
                                 iw_samples=args.iw_samples, **options)  # fmt: skip
                records = output.score_records(r, names, top=args.top if ask else 0, per_feature=args.per_feature)
                head |= {"threshold": r.threshold} | ({} if args.alpha is None else {"alpha": args.alpha})
            elif command == "embed":
                r = client.embed(info.name, x, labels, posterior_samples=args.samples, seed=args.seed, **options)
                records = output.embed_records(r)
            elif command == "reconstruct":
                records = output.reconstruct_records(client.reconstruct(info.name, x, labels, **options), names)
            else:
                decoded = client.decode(info.name, x, labels, **options)
                records = output.sample_records(decoded, names, labels=labels)
    finally:
        progress.close()
    _show(args, info, head, records)
    return 0


def _show(args, info, head: dict, records: list[dict]) -> None:
    from vaeserve.service import output

    anomalies = sum(r["is_anomaly"] for r in records) if "threshold" in head else None
    if args.out is not None:
        output.write_records(args.out, records)
        flagged = "" if anomalies is None else f", {anomalies:,} anomalous"
        print(f"vaeserve client: wrote {len(records):,} rows to {args.out}{flagged}", file=sys.stderr)
    elif args.json:
        print(output.dumps(head | {"rows": records}))
    else:
        if anomalies is not None:
            at = f"alpha {head['alpha']:g}, " if "alpha" in head else ""
            print(f"{info.name} version {info.version}: {at}threshold {output.number(head['threshold'])} on "
                  f"{info.threshold_score}; {anomalies:,} of {len(records):,} rows anomalous")  # fmt: skip
        output.print_table(records)
        samples = output.sample_table_records(records)
        if samples:
            print(f"\nposterior samples, {len(samples) // len(records)} per row")
            output.print_table(samples)


def _input(args, info, names, command):
    """(rows, labels) from the input file and --labels."""
    from vaeserve.service.rows import read_rows

    by_name = command != "decode"
    columns = names if by_name else tuple(f"z[{i}]" for i in range(info.latent_dim))
    label_column = args.label_column or info.label_column or "label"
    rows = read_rows(args.input, columns, label_column=label_column, conditional=info.conditional, by_name=by_name)
    for note in rows.notes:
        print(f"vaeserve client: {note}", file=sys.stderr)
    labels = _flag_labels(args.labels)
    if labels is not None and rows.labels is not None:
        raise ConfigError(f"{args.input} has a label column {label_column!r}, and --labels was given: use one")
    labels = rows.labels if labels is None else _labels_per_row(labels, len(rows.x))
    if info.conditional and labels is None:
        where = f"no label column {label_column!r} (--label-column NAME names another) and no --labels"
        if command != "score":
            raise DataError(f"{args.input}: {where}, and model {info.name} is conditional: it needs each row's label")
        print(f"vaeserve client: {args.input}: {where}: scored label-free", file=sys.stderr)
    return rows.x, labels


def _flag_labels(text: str | None) -> list[str] | None:
    return None if not text else [label.strip() for label in text.split(",")]


def _labels_per_row(labels: list[str], rows: int) -> list[str]:
    """--labels: one per row, or one for every row."""
    return labels * rows if len(labels) == 1 else labels


def _only_model(client) -> str:
    models = client.models()
    if len(models) != 1:
        raise ConfigError(f"the server serves {sorted(models)}; name one with --model")
    return next(iter(models))
