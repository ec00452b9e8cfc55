"""Baseline for bench/mutate.py: the least an aiohttp TLS admission handler can do (parse the
review, answer allowed: true). Same framework, same TLS setup, same JSON library, no kvmesh
logic."""

import ssl
import sys

import orjson
from aiohttp import web


async def mutate(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    return web.Response(body=orjson.dumps({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "response": {"uid": body["request"]["uid"], "allowed": True}}),
        content_type="application/json")


def main() -> None:
    port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    app = web.Application(client_max_size=3 * 1024 * 1024)
    app.router.add_post("/mutate", mutate)
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=ctx, access_log=None,
                print=None)


if __name__ == "__main__":
    main()
