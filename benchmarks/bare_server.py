"""Serving with none of a server's work, a contestant of serve-one: one Starlette route on uvicorn (httptools) that
parses the body with orjson, runs ``Embedder.encode`` in a worker thread and writes the normalised vectors with
orjson; no checks, no batching, no metrics, no error answers. Not a server to use: it shows what any server built
on this stack costs a client before it does any of a server's work.

    python -m benchmarks.bare_server MODEL PRECISION PORT
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    import anyio
    import orjson
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from bge_onnx import Embedder

    model, precision, port = argv
    embedder = Embedder(model, precision=precision)

    async def embed(request) -> Response:
        texts = orjson.loads(await request.body())["inputs"]
        rows = await anyio.to_thread.run_sync(embedder.encode, texts)
        return Response(orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    async def health(request) -> Response:
        return Response(b"")

    app = Starlette(routes=[Route("/embed", embed, methods=["POST"]), Route("/health", health)])
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning", http="httptools")


if __name__ == "__main__":
    main(sys.argv[1:])
