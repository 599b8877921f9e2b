"""The bge-onnx command line: export, embed, rerank, info, serve (thin over the Python API)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings
from pathlib import Path

from .checks import env_flag, positive_int
from .default_model import DEFAULT_MODEL_NAME, default_model, export_function
from .errors import BgeOnnxError, InputError, MissingExtraError, install_hint
from .storage import OutputDtype


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cmd_export(args: argparse.Namespace) -> int:
    export_model = export_function()
    export_model(
        args.src,
        args.out,
        revision=args.revision,
        pooling=args.pooling,
        max_length=args.max_length,
        query_instruction=args.query_instruction,
        check_parity=not args.no_parity,
        precisions=args.precision,
        allow_below_gate=args.allow_below_gate,
        overwrite=args.force,
        graph_from=args.graph_from,
        log=None if args.quiet else _say,
    )
    return 0


def _cmd_optimize(args: argparse.Namespace) -> int:
    try:
        from bge_onnx_export.optimize import optimize_model

        optimize_model(
            args.src,
            args.out,
            revision=args.revision,
            pooling=args.pooling,
            max_length=args.max_length,
            query_instruction=args.query_instruction,
            precisions=args.precision,
            allow_below_gate=args.allow_below_gate,
            overwrite=args.force,
            graph=args.file,
            log=None if args.quiet else _say,
        )
    except ImportError as err:  # onnx, or sympy that onnxruntime's optimiser imports when it runs
        raise MissingExtraError(f"optimize needs onnx and sympy ({err}), not torch: {install_hint('optimize')}") from err
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from . import files
    from .embedder import Embedder

    stdin_format = args.input in (None, "-", "lines", "jsonl")  # lines|jsonl: today's stdin formats
    path = None if stdin_format else args.input
    fmt = args.input_format or ({"lines": "txt", "jsonl": "jsonl"}.get(args.input) if stdin_format else None)
    source = files.Source(path, "txt" if fmt == "lines" else fmt, text_field=args.text_field, id_field=args.id_field)
    out_format = files.output_format(args.output, args.format)
    if out_format == "npy" and args.output is None and sys.stdout.isatty():
        raise InputError("refusing to write binary .npy to a terminal; redirect stdout or use -o FILE")
    if args.resume and args.output is None:
        raise InputError("--resume continues a file: pass -o FILE")
    if args.resume and args.force:
        raise InputError("--resume continues FILE.partial and --force discards it: pass one of them")
    model = args.model or default_model()
    embedder = Embedder(model, **_runtime_kwargs(args))
    # ids go out with the vectors when the rows have any: read from a file or JSONL on stdin (as from a JSONL file:
    # a row's "id", else its line number), or --id-field named
    with_ids = path is not None or bool(args.id_field) or source.fmt == "jsonl"
    writer = files.WRITERS[out_format](args.output, embedder.dim, with_ids=with_ids, output_dtype=args.output_dtype)
    try:
        summary = files.embed_rows(
            embedder, source, writer, resume=args.resume, force=args.force, rejects=args.rejects,
            prefix=embedder.query_instruction if args.queries else "", batch_size=args.batch_size,
            normalize=not args.no_normalize, progress=sys.stderr.isatty(), output_dtype=args.output_dtype,
        )
    except KeyboardInterrupt:
        if writer.partial is not None and writer.partial.exists():
            _say(f"bge-onnx: interrupted; {writer.rows} vectors are kept in {writer.partial}: run the same command "
                 "with --resume to continue from there")
        raise
    if args.output or args.rejects:
        resumed = f" ({summary.resumed} of them by an earlier run)" if summary.resumed else ""
        rejected = f"; {summary.rejected} bad rows rejected to {args.rejects}" if args.rejects else ""
        _say(f"bge-onnx: wrote {summary.written} vectors to {args.output or 'stdout'}{resumed}{rejected}")
    return 0


def _cmd_rerank(args: argparse.Namespace) -> int:
    from . import files
    from .reranker import Reranker

    reranker = Reranker(args.model, **_runtime_kwargs(args))
    # the same reader as embed's stdin: the same formats, the same messages for a bad line
    source = files.Source(None, "txt" if args.input == "lines" else "jsonl")
    passages = []
    for row in source.rows():
        if isinstance(row, files.BadRow):
            raise InputError(source.message(row))
        passages.append(row.text)
    results = reranker.rerank(args.query, passages, top_k=args.top_k, normalize=args.normalize, batch_size=args.batch_size)
    for result in results:
        sys.stdout.write(json.dumps({"index": result.index, "score": result.score, "text": result.text}, ensure_ascii=False) + "\n")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from . import adopt, hub
    from .spec import MANIFEST, read_spec, verify_files

    model = args.model or default_model()
    folder = hub.resolve(model, revision=args.revision, local_files_only=True)
    in_cache = folder.parent.name == "snapshots"
    if not (folder / MANIFEST).is_file() and adopt.find_graph(folder) is not None:
        names = adopt.needed_files(folder)
        hub.verify_hub_files(folder, names, full=True)
        for name in names:
            state = "ok" if (folder / name).is_symlink() else "unchecked (no hash from the hub)"
            print(f"{state}\t{name}")
        return 0
    spec = read_spec(folder)
    for name in spec.files:
        if in_cache and not (folder / name).exists():
            print(f"not downloaded\t{name}")
            continue
        verify_files(folder, spec, [name], full=True)
        print(f"ok\t{name}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from . import card, hub
    from .folder import read_any_spec

    model = args.model or default_model()
    folder = hub.resolve(model, revision=args.revision)
    spec = read_any_spec(folder, str(model))
    if args.json:
        print(json.dumps(spec.to_dict(), indent=2, ensure_ascii=False))
        return 0
    lines = card.summary(folder, spec)
    print("\n".join(lines))
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from . import hub
    from .folder import files_to_load
    from .session import CUDA, choose_providers

    if not hub.looks_like_repo_id(args.model) or Path(args.model).expanduser().exists():
        raise InputError(f"pull takes a hub repo id 'owner/name', got {args.model!r}")
    on_cuda = CUDA in choose_providers(args.device)
    precisions = ["fp32", "int8", "fp16"] if args.precision == "all" else [args.precision]

    def files_for(spec) -> list[str]:
        wanted = [p for p in precisions if args.precision != "all" or p in spec.variants]
        with warnings.catch_warnings():  # "fp16 on CPU is slow" concerns a run, not a download
            warnings.simplefilter("ignore")
            files = [f for p in wanted for f in files_to_load(spec, p, on_cuda=on_cuda, folder=Path(args.model))]
        return list(dict.fromkeys(files))

    print(hub.resolve(args.model, revision=args.revision, files_for=files_for, refresh=True))
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .push import push

    print(push(args.folder, args.repo_id, revision=args.revision, private=args.private, commit_message=args.message))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .registry import KNOWN_MODELS

    for model_id, known in KNOWN_MODELS.items():
        pooling = known.pooling.value if known.pooling else "-"
        row = [model_id, known.task.value, pooling, str(known.dim), str(known.max_length),
               known.query_instruction or "-", " ".join(known.onnx_files) or "-"]
        print("\t".join(row))
    return 0


# bge-onnx serve. Every flag may come from a BGE_ONNX_* variable instead (a container sets those); a flag wins.
def _non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value!r}")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not 0 < number < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value!r}")
    return number


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import signal

    try:
        import uvicorn

        from .serve import ServeConfig, create_app
    except ImportError as err:
        raise MissingExtraError(f"serve needs starlette, uvicorn and prometheus-client ({err}): {install_hint('serve')}") from err
    config = ServeConfig(
        args.model, reranker=args.reranker, host=args.host, port=args.port, max_batch_tokens=args.max_batch_tokens,
        max_client_batch_size=args.max_client_batch_size, openai_max_inputs=args.openai_max_inputs,
        max_concurrent_requests=args.max_concurrent_requests, cors_allow_origin=tuple(args.cors_allow_origin or ()),
        payload_limit=args.payload_limit, body_timeout=args.body_timeout, auto_truncate=args.auto_truncate or env_flag("BGE_ONNX_AUTO_TRUNCATE"),
        api_key=args.api_key or None, max_wait_ms=args.max_wait_ms, max_queue_ms=args.max_queue_ms,
        isolate_batches=args.isolate_batches or env_flag("BGE_ONNX_ISOLATE_BATCHES"), precision=args.precision,
        revision=args.revision, device=args.device, threads=args.threads, max_length=args.max_length,
    )
    server: uvicorn.Server | None = None

    def stop() -> None:
        server.should_exit = True

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")  # as uvicorn's own lines
    app = create_app(config, on_load_failure=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, access_log=False,
                                           log_level="info", lifespan="on"))
    # uvicorn raises the signal it stopped for again once its graceful shutdown is over (in-flight requests
    # answered); ignoring it then makes a SIGTERM'd server exit 0, as a container orchestrator expects.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    return 1 if app.state.service.error or not server.started else 0


def _serve_parser(commands) -> None:
    def env(name: str, default: str | None = None) -> str | None:
        return os.environ.get(f"BGE_ONNX_{name}") or default

    serve = commands.add_parser(
        "serve", help="serve an embedding model (and a reranker) over HTTP: TEI's and OpenAI's APIs",
        description="An HTTP server ([serve] extra): TEI's routes (/embed, /rerank, /predict, /similarity, "
                    "/tokenize, /decode, /, /invocations, /info, /health, /ping, /metrics); OpenAI's /v1/embeddings "
                    "and /v1/models; a Cohere-style /v1/rerank. Concurrent requests are merged into the "
                    "runtime's token-budget batches. Each flag can be set by the variable named in its help.")
    serve.add_argument("model", nargs="?", default=env("MODEL"), metavar="MODEL",
                       help="embedding model folder or hub id ($BGE_ONNX_MODEL); may be omitted with --reranker")
    serve.add_argument("--reranker", default=env("RERANKER"), metavar="MODEL",
                       help="also serve this reranker folder or hub id ($BGE_ONNX_RERANKER)")
    serve.add_argument("--host", default=env("HOST", "127.0.0.1"),
                       help="address to listen on ($BGE_ONNX_HOST; default 127.0.0.1; 0.0.0.0 in a container)")
    serve.add_argument("--port", type=_positive_int, default=env("PORT", "8080"), help="($BGE_ONNX_PORT; default 8080)")
    serve.add_argument("--max-batch-tokens", type=_positive_int, default=env("MAX_BATCH_TOKENS"),
                       help="padded tokens per forward pass ($BGE_ONNX_MAX_BATCH_TOKENS; default 512 on CPU, 16384 on CUDA)")
    serve.add_argument("--max-client-batch-size", type=_positive_int, default=env("MAX_CLIENT_BATCH_SIZE", "32"),
                       help="most inputs in one request ($BGE_ONNX_MAX_CLIENT_BATCH_SIZE; default 32)")
    serve.add_argument("--openai-max-inputs", type=_positive_int, default=env("OPENAI_MAX_INPUTS", "2048"), metavar="N",
                       help="most inputs in one /v1/embeddings request ($BGE_ONNX_OPENAI_MAX_INPUTS; default 2048, "
                            "OpenAI's own limit)")
    serve.add_argument("--cors-allow-origin", nargs="+", metavar="ORIGIN",
                       default=(env("CORS_ALLOW_ORIGIN") or "").split(",") if env("CORS_ALLOW_ORIGIN") else None,
                       help="let browser pages from these origins call the server ('*': any; "
                            "$BGE_ONNX_CORS_ALLOW_ORIGIN, comma-separated); default: no CORS headers")
    serve.add_argument("--max-concurrent-requests", type=_positive_int, default=env("MAX_CONCURRENT_REQUESTS", "512"),
                       help="requests in flight; more are answered 429 at once ($BGE_ONNX_MAX_CONCURRENT_REQUESTS; default 512)")
    serve.add_argument("--payload-limit", type=_positive_int, default=env("PAYLOAD_LIMIT", "2000000"), metavar="BYTES",
                       help="largest request body; larger is answered 413 ($BGE_ONNX_PAYLOAD_LIMIT; default 2000000)")
    serve.add_argument("--body-timeout", type=_positive_float, default=env("BODY_TIMEOUT", "60"), metavar="SECONDS",
                       help="time a request's body may take to arrive; later is answered 408 and the connection closed "
                            "($BGE_ONNX_BODY_TIMEOUT; default 60)")
    serve.add_argument("--auto-truncate", action="store_true",
                       help="cut texts over the model's max length instead of refusing them ($BGE_ONNX_AUTO_TRUNCATE=1)")
    serve.add_argument("--api-key", default=env("API_KEY"), metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on all but GET /health, /ping, / and /metrics ($BGE_ONNX_API_KEY)")
    serve.add_argument("--max-wait-ms", type=_non_negative_float, default=env("MAX_WAIT_MS", "2"), metavar="MS",
                       help="how long a request that finds the model idle waits for others to batch with, when "
                            "others are on their way (a lone client's request runs at once) ($BGE_ONNX_MAX_WAIT_MS; "
                            "default 2)")
    serve.add_argument("--max-queue-ms", type=_non_negative_float, default=env("MAX_QUEUE_MS", "2000"), metavar="MS",
                       help="answer 429 (with Retry-After) while the work queued ahead would take longer than this at "
                            "the model's measured rate; 0: off ($BGE_ONNX_MAX_QUEUE_MS; default 2000)")
    serve.add_argument("--isolate-batches", action="store_true",
                       help="never merge requests: each runs in batches of its own; matters only for the per-batch int8 "
                            "of older exports (a no-op for fp32, fp16 and per-token int8) ($BGE_ONNX_ISOLATE_BATCHES=1)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], default=env("DEVICE", "auto"),
                       help="execution device ($BGE_ONNX_DEVICE; default auto)")
    serve.add_argument("--precision", choices=["auto", "fp32", "int8", "fp16"], default=env("PRECISION", "auto"),
                       help="graph to run ($BGE_ONNX_PRECISION; default auto = int8 on CPU / fp16 on CUDA when "
                            "exported and within its gate, else fp32)")
    serve.add_argument("--threads", type=_positive_int, help="CPU threads (default: $BGE_ONNX_THREADS or the usable CPUs)")
    serve.add_argument("--max-length", type=_positive_int, default=env("MAX_LENGTH"),
                       help="token limit per text ($BGE_ONNX_MAX_LENGTH; default the model's)")
    serve.add_argument("--revision", default=env("REVISION"), help="hub revision when MODEL is a repo id ($BGE_ONNX_REVISION)")
    serve.set_defaults(run=_cmd_serve)


def _positive_int(value: str) -> int:
    try:
        return positive_int("the value", int(value))
    except ValueError:  # not an int, or InputError (a ValueError): below 1
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value!r}") from None


def _runtime_kwargs(args: argparse.Namespace) -> dict:
    """The load options the flags give (--batch-size goes to each call instead)."""
    from .handle import LoadOptions

    return dataclasses.asdict(LoadOptions(device=args.device, precision=args.precision, threads=args.threads,
                                          max_length=args.max_length, max_tokens=args.max_tokens,
                                          revision=args.revision))


def _runtime_options(parser: argparse.ArgumentParser, *, files: bool = False) -> None:
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="execution device (default: auto)")
    parser.add_argument("--precision", choices=["auto", "fp32", "int8", "fp16"], default="auto",
                        help="graph to run (default: auto = int8 on CPU / fp16 on CUDA when exported and within its gate, else fp32)")
    parser.add_argument("--threads", type=_positive_int, help="CPU threads (default: $BGE_ONNX_THREADS or the usable CPUs)")
    parser.add_argument("--batch-size", type=_positive_int, help="at most this many texts per forward pass (default: 256)")
    parser.add_argument("--max-tokens", type=_positive_int, help="at most this many padded tokens per forward pass (default: 512 on CPU, 16384 on CUDA)")
    parser.add_argument("--max-length", type=_positive_int, help="token limit (default: the model's)")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit) when MODEL is a repo id")
    if files:
        parser.add_argument("--input", metavar="FILE", help="read this .txt, .jsonl or .parquet file instead of stdin "
                            "('lines' or 'jsonl': stdin in that format, as --input-format)")
        return
    parser.add_argument("--input", choices=["lines", "jsonl"], default="lines",
                        help="stdin format: one text per line, or JSONL strings / objects with 'text' (default: lines)")


def _conversion_options(parser: argparse.ArgumentParser, what: str) -> None:
    """What export and optimize share: the source, the folder to write, the settings, the precisions."""
    parser.add_argument("src", metavar="SRC", help=f"{what} folder or hub repo id")
    parser.add_argument("--out", required=True, metavar="DIR", help="model folder to create")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
    parser.add_argument("--pooling", choices=["cls", "mean"], help=f"needed only when the {what} does not say")
    parser.add_argument("--max-length", type=_positive_int, help=f"token limit (default: the {what}'s)")
    parser.add_argument("--query-instruction", help="text put before queries by encode_queries / --queries")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "int8", "fp16"], default=["fp32"], metavar="P",
                        help="graphs to write: fp32 (always), int8 (CPU), fp16 (CUDA) (default: fp32)")
    parser.add_argument("--allow-below-gate", action="store_true",
                        help="keep an int8/fp16 graph that fails its quality gate (runtime 'auto' will not pick it)")
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bge-onnx",
        description="BGE embeddings and reranking on onnxruntime, without torch.",
        epilog="Exit status: 0 success, 1 error (bad model or input), 2 usage error.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    export = commands.add_parser("export", help="convert a Hugging Face checkpoint to a bge-onnx model folder",
                                 description="Convert a checkpoint (local folder or hub id) to ONNX, with a parity check "
                                             "against PyTorch (where torch is installed) or a numpy forward pass.")
    _conversion_options(export, "checkpoint")
    export.add_argument("--no-parity", action="store_true", help="skip the comparison with the reference")
    export.add_argument("--graph-from", choices=["auto", "weights", "torch"], default="auto",
                        help="weights: build the graph from the checkpoint's tensors, no torch (BERT and XLM-RoBERTa "
                             "encoders, their rerankers, bge-m3); torch: trace it (needs torch); auto (default): "
                             "weights where the builder covers the checkpoint")
    export.set_defaults(run=_cmd_export)

    optimize = commands.add_parser(
        "optimize", help="turn an existing ONNX export into a bge-onnx model folder, without torch",
        description="Convert an ONNX export (an official repo's onnx/ folder, an optimum or sentence-transformers "
                    "export; local folder or hub id) to a bge-onnx folder: fusions, pooling in the graph, the "
                    "first-token cut, gated int8/fp16, a manifest. Checked against the source graph itself.")
    _conversion_options(optimize, "source (or a .onnx file in one)")
    optimize.add_argument("--file", metavar="GRAPH",
                          help="the fp32 graph to start from, relative to SRC (e.g. onnx/model_O1.onnx; default "
                               "onnx/model.onnx, else model.onnx)")
    optimize.set_defaults(run=_cmd_optimize)

    embed = commands.add_parser(
        "embed", help="embed texts from stdin or a file",
        description="Embed texts read from stdin or --input FILE; vectors go to stdout or -o FILE in input order. "
                    "A file is streamed in constant memory and written to FILE.partial, renamed to FILE when "
                    "complete; --resume continues an interrupted run. A bad row (invalid UTF-8, a lone surrogate, "
                    "not a string, no text field) stops the run naming its line, unless --rejects is given.")
    embed.add_argument("model", nargs="?", metavar="MODEL",
                       help=f"model folder or hub id (default: {DEFAULT_MODEL_NAME}, exported to the cache on first use)")
    embed.add_argument("--queries", action="store_true", help="texts are search queries: prepend the model's instruction")
    embed.add_argument("--input-format", choices=["txt", "lines", "jsonl", "parquet"],
                       help="input format (default: from the --input file's extension, else lines)")
    embed.add_argument("--text-field", default="text", metavar="NAME",
                       help="the text's field in JSONL objects or column in Parquet (default: text)")
    embed.add_argument("--id-field", metavar="NAME",
                       help="the id's field or column, kept with each vector (default: id when present, else the "
                            "1-based line or row number)")
    embed.add_argument("--format", choices=["jsonl", "npy", "parquet"],
                       help="output: a JSON array (or {id, embedding} object) per line, one .npy, or Parquet with id "
                            "and embedding columns (default: from -o FILE's extension, else jsonl)")
    embed.add_argument("-o", "--output", metavar="FILE", help="write here (.npy, .jsonl or .parquet) instead of stdout")
    embed.add_argument("--resume", action="store_true",
                       help="continue from the rows in FILE.partial left by an interrupted run with the same input")
    embed.add_argument("--force", action="store_true",
                       help="discard FILE.partial left by an interrupted run and start over (without --resume or "
                            "--force, an existing FILE.partial is an error)")
    embed.add_argument("--rejects", metavar="FILE",
                       help="write bad rows here (JSONL: line, reason, row) and go on instead of stopping")
    embed.add_argument("--no-normalize", action="store_true", help="keep raw pooled vectors")
    embed.add_argument("--output-dtype", choices=[d.value for d in OutputDtype], default="float32",
                       help="vectors for storage, as sentence-transformers' quantize_embeddings writes them: int8/uint8 "
                            "by the model's per-dimension ranges, binary/ubinary the sign bits packed 8 to a byte "
                            "(npy: int8/uint8 arrays; jsonl: integers; parquet: list<int8>/list<uint8>)")
    _runtime_options(embed, files=True)
    embed.set_defaults(run=_cmd_embed)

    rerank = commands.add_parser("rerank", help="rank passages from stdin against a query",
                                 description="Score passages read from stdin against --query; JSONL results, best first.")
    rerank.add_argument("model", metavar="MODEL", help="reranker folder or hub id")
    rerank.add_argument("--query", required=True, help="the query")
    rerank.add_argument("--top-k", type=_positive_int, help="keep the best K (default: all)")
    rerank.add_argument("--normalize", action="store_true", help="sigmoid scores in (0, 1)")
    _runtime_options(rerank)
    rerank.set_defaults(run=_cmd_rerank)

    info = commands.add_parser("info", help="show a model folder's manifest",
                               description="Show what a model folder holds: task, pooling, lengths, parity, versions.")
    info.add_argument("model", nargs="?", metavar="MODEL", help=f"model folder or hub id (default: {DEFAULT_MODEL_NAME})")
    info.add_argument("--revision", help="hub revision")
    info.add_argument("--json", action="store_true", help="print the raw manifest")
    info.set_defaults(run=_cmd_info)

    verify = commands.add_parser(
        "verify", help="hash every file of a model folder against its manifest",
        description="Hash every file of MODEL in full against the sha256 its manifest records (for an ONNX export "
                    "without a manifest, against the hub's hashes) and print one line per file: ok, or not "
                    "downloaded for a hub cache's other variants. A load hashes a file only when it changed since "
                    "its last full check (docs/decisions.md section 14); this re-hashes all. Exit status 1 and the "
                    "file's name when one does not match. Never uses the network.")
    verify.add_argument("model", nargs="?", metavar="MODEL", help=f"model folder or hub id (default: {DEFAULT_MODEL_NAME})")
    verify.add_argument("--revision", help="hub revision")
    verify.set_defaults(run=_cmd_verify)

    pull = commands.add_parser("pull", help="download a hub repo's files into the cache and print its folder",
                               description="Fill the hub cache with a bge-onnx repo (a container build step): the "
                                           "manifest, the tokenizer and the graph a load would use here (or every "
                                           "graph). Asks the hub which commit the revision names now, so a branch "
                                           "moves only here; later loads use the cache without the network.")
    pull.add_argument("model", metavar="MODEL", help="hub repo id, owner/name")
    pull.add_argument("--revision", help="branch, tag or commit (default: main)")
    pull.add_argument("--precision", choices=["auto", "fp32", "int8", "fp16", "all"], default="auto",
                      help="graph to fetch (default: auto = what a load on this machine's --device picks; all: every graph)")
    pull.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                      help="the device the model will run on, for --precision auto (default: auto)")
    pull.set_defaults(run=_cmd_pull)

    push = commands.add_parser("push", help="upload an exported model folder to a hub repo, with a model card",
                               description="Check DIR against its manifest (every file's sha256), then upload the "
                                           "files the manifest lists, the manifest and a generated model card "
                                           "(README.md: parity and gate figures, the export command) to REPO_ID in "
                                           "one commit, creating the repo if needed. The token comes from $HF_TOKEN "
                                           "or `hf auth login`. Prints the commit's URL.")
    push.add_argument("folder", metavar="DIR", help="a model folder written by `bge-onnx export`")
    push.add_argument("repo_id", metavar="REPO_ID", help="hub repo id, owner/name")
    push.add_argument("--revision", metavar="BRANCH", help="branch to commit to, created from main if missing (default: main)")
    push.add_argument("--private", action="store_true", help="create the repo private (no effect on an existing repo)")
    push.add_argument("--message", metavar="M", help="commit message (default: names the source model and variants)")
    push.set_defaults(run=_cmd_push)

    models = commands.add_parser("models", help="list the known BGE models",
                                 description="The registry of known models, one per line, tab-separated: id, task, "
                                             "pooling, dimension, max length, query instruction, the official repo's ONNX files ('-' for none).")
    models.set_defaults(run=_cmd_models)
    _serve_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BgeOnnxError as err:
        _say(f"bge-onnx: error: {err}")
        return 1
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error; keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
