"""Local inference API: KServe v2 / Open Inference Protocol over HTTP (aiohttp).

Bound to 127.0.0.1 by default. Every error answers in the protocol's format
({"error": "..."}) with a 4xx/5xx status; nothing a client sends can crash the agent."""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from aiohttp import web

from device_agent import __version__
from device_agent.kserve import HEADER_LEN, decode_request, encode_response, tensor_meta
from device_agent.model import InferenceError, Model
from device_agent.stats import InferenceStats
from edgebundle.errors import EdgepackError

log = logging.getLogger("edgepack.agent.api")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def create_app(get_model: Callable[[], Model | None], *, stats: InferenceStats, token: str | None = None,
               max_body_bytes: int = 16 << 20, workers: int = 4) -> web.Application:
    """`get_model` returns the model serving right now (it may change between requests:
    a request keeps the model it started with, so a swap never breaks one in flight)."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infer")

    @web.middleware
    async def errors(request: web.Request, handler):
        if token and not request.path.startswith("/v2/health"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _error(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"request body over the limit of {max_body_bytes} bytes")
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return _error(e.status, e.reason)

    def current(request: web.Request) -> Model:
        model = get_model()
        name = request.match_info["name"]
        if model is None:
            raise web.HTTPServiceUnavailable(reason="no model is loaded yet")
        if name != model.name:
            raise web.HTTPNotFound(reason=f"unknown model {name!r}; this agent serves {model.name!r}")
        version = request.match_info.get("version")
        if version is not None and version != model.version:
            raise web.HTTPNotFound(reason=f"model {name!r} has no version {version!r} (serving {model.version})")
        return model

    async def live(_):
        return web.json_response({"live": True})

    async def ready(_):
        ok = get_model() is not None
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def server_meta(_):
        return web.json_response({"name": "edgepack-agent", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def model_meta(request):
        m = current(request)
        man = m.manifest
        return web.json_response({
            "name": m.name, "versions": [m.version], "platform": f"{man.format}_{m.runtime.details.get('runtime')}",
            "inputs": [tensor_meta(t) for t in man.inputs], "outputs": [tensor_meta(t) for t in man.outputs],
            "parameters": {"precision": man.precision, "target": man.target.get("name"),
                           "bundle_sha256": m.bundle_sha256}})

    async def model_ready(request):
        m = current(request)
        return web.json_response({"name": m.name, "ready": True})

    async def infer(request):
        m = current(request)  # pinned for this request: a swap cannot change it midway
        body = await request.read()
        try:
            req, arrays, wanted = decode_request(body, request.headers.get(HEADER_LEN))
            t0 = time.perf_counter()
            results = await asyncio.get_running_loop().run_in_executor(pool, m.infer, arrays)
            ms = (time.perf_counter() - t0) * 1000
            payload, headers = encode_response(model=m.name, version=m.version, req=req, results=results,
                                               requested=wanted)
        except InferenceError as e:
            stats.record(None, ok=False)
            return _error(400, str(e).split("\n")[0])
        except EdgepackError as e:
            stats.record(None, ok=False)
            return _error(400, str(e).split("\n")[0])
        except Exception as e:  # a runtime failure on valid input: report it, keep serving
            stats.record(None, ok=False)
            log.exception("inference failed")
            return _error(500, f"inference failed: {type(e).__name__}: {e}")
        stats.record(ms)
        return web.Response(body=payload, headers=headers)

    app = web.Application(middlewares=[errors], client_max_size=max_body_bytes)
    r = app.router
    r.add_get("/v2/health/live", live)
    r.add_get("/v2/health/ready", ready)
    r.add_get("/v2", server_meta)
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        r.add_get(prefix, model_meta)
        r.add_get(prefix + "/ready", model_ready)
        r.add_post(prefix + "/infer", infer)

    async def close_pool(_app):
        pool.shutdown(wait=True)

    app.on_cleanup.append(close_pool)
    return app
