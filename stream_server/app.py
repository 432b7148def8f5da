"""The ASGI application: the session socket, the HTTP endpoints and the web client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.samples import Sample
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from inference.avatars.jobs import AvatarBusy, JobStatus, PreparationJob
from inference.avatars.layout import InvalidAvatarId, is_avatar_id, validate_avatar_id
from inference.avatars.preparer import PreparationsFull
from inference.engine import AvatarInfo
from inference.serving_engine import ServingEngine
from stream_server.admission.store import StoreUnavailable
from stream_server.avatar_upload import UploadRefused, receive_avatar_upload
from stream_server.hello_deadline import HelloDeadline
from stream_server.node import Node
from stream_server.outbox import Outbox
from stream_server.protocol import (
    CloseCode,
    ErrorCode,
    ProtocolError,
    error_message,
    message_id,
    parse_client_message,
)
from stream_server.session.session import STORE_RETRY_S
from stream_server.settings import Settings
from stream_server.ws_abort import ABORT

log = logging.getLogger(__name__)
WEB_CLIENT = Path(__file__).resolve().parent.parent / "web_client"


def _origin_of(scheme: str, netloc: str) -> str:
    scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    return f"{scheme}://{netloc}".lower()


def origin_allowed(websocket_or_request: WebSocket | Request, allowed: list[str]) -> bool:
    """Browsers send Origin; other clients usually do not. Without an allow-list only same-origin
    pages (and clients without an Origin) may connect. Origins compare scheme, host and port: an
    ``http://`` page is not the ``https://`` site (behind a TLS proxy, uvicorn takes the scheme from
    ``X-Forwarded-Proto``)."""
    origin = websocket_or_request.headers.get("origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    if allowed:
        return "*" in allowed or _origin_of(parts.scheme, parts.netloc) in {
            _origin_of(*urlsplit(a.rstrip("/"))[:2]) for a in allowed
        }
    url = websocket_or_request.url
    host = websocket_or_request.headers.get("host", "")
    return _origin_of(parts.scheme, parts.netloc) == _origin_of(url.scheme, host)


def cors_headers(request: Request, allowed: list[str]) -> dict[str, str]:
    """CORS for public reads by pages on the allowed origins (the widget lists avatars)."""
    origin = request.headers.get("origin")
    if origin is None or not allowed or not origin_allowed(request, allowed):
        return {}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


def cut_off(websocket: WebSocket, node: Node, address: str, why: str) -> None:
    """Drop the connection of a client that does not read: a close would wait for it to read.
    The ``stalled`` error it earned cannot reach it; it is counted all the same."""
    node.metrics.rejections.labels(ErrorCode.STALLED.value).inc()
    abort = websocket.scope.get("extensions", {}).get(ABORT, {}).get("abort")
    if abort is None:
        log.warning("cannot abort the connection of %s (%s): this server has no %s extension", address, why, ABORT)
        return
    log.info("aborting the connection of %s: %s", address, why)
    abort()


async def hang_up(websocket: WebSocket, outbox: Outbox, code: CloseCode) -> None:
    """Close the socket from outside its receive loop (which then sees the disconnect), after
    what was queued for it, or at most 2 s."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(outbox.drained(), 2.0)
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await websocket.close(int(code))


async def session_socket(websocket: WebSocket, node: Node) -> None:
    if not origin_allowed(websocket, node.settings.server.allowed_origins):
        node.metrics.rejections.labels(ErrorCode.FORBIDDEN_ORIGIN.value).inc()
        denial = error_message(ProtocolError(ErrorCode.FORBIDDEN_ORIGIN, "this origin may not connect"))
        await websocket.send_denial_response(
            Response(denial.encode(), status_code=403, media_type="application/json")
        )
        return
    await websocket.accept()

    async def send(item: str | bytes) -> None:
        if isinstance(item, str):
            await websocket.send_text(item)
        else:
            await websocket.send_bytes(item)

    outbox = Outbox(
        send,
        coalesce_s=node.settings.queue.coalesce_s,
        max_bytes=node.settings.limits.outbox_bytes,
        stall_timeout_s=node.settings.stream.stall_timeout_s,
        tally=node.outbox_tally,
    )
    outbox.on_status_sent = node.metrics.position_pushes.inc
    client = websocket.client
    address = client.host if client else "unknown"
    outbox.on_stuck = lambda why: cut_off(websocket, node, address, why)
    session = node.session(outbox, address)
    session.hang_up = lambda code: hang_up(websocket, outbox, code)
    node.metrics.connections.inc()
    limits = node.settings.limits
    hello_deadline = HelloDeadline(limits.hello_timeout_s, lambda: session.identity is not None)
    close_code: int | None = None
    try:
        while close_code is None:
            try:
                message = await hello_deadline.receive(websocket.receive)
            except ProtocolError as err:
                session.send_error(err)
                close_code = err.close
                break
            if message["type"] == "websocket.disconnect":
                break
            text, data = message.get("text"), message.get("bytes")
            msg_id = None
            try:
                size = len(text.encode()) if text is not None else len(data or b"")
                if size > limits.max_message_bytes:
                    raise ProtocolError(
                        ErrorCode.MESSAGE_TOO_LARGE,
                        f"messages are limited to {limits.max_message_bytes} bytes",
                        close=CloseCode.MESSAGE_TOO_BIG,
                    )
                if text is not None:
                    msg_id = message_id(text)
                    await session.handle(parse_client_message(text))
                elif data is not None:
                    await session.handle_audio(data)
            except ProtocolError as err:
                session.send_error(err, msg_id)
                if err.code is ErrorCode.BAD_MESSAGE:
                    session.bad_messages += 1
                    if session.bad_messages >= limits.bad_message_limit:
                        close_code = CloseCode.POLICY_VIOLATION
            if session.close_code is not None:
                close_code = session.close_code
        if close_code is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(outbox.drained(), 2.0)
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await websocket.close(int(close_code))
    except WebSocketDisconnect:
        pass
    except Exception:
        log.exception("session %s failed", session.id)
        with contextlib.suppress(Exception):
            await send(error_message(ProtocolError(ErrorCode.INTERNAL, "server fault")).encode())
            await websocket.close(CloseCode.INTERNAL_ERROR)
    finally:
        await session.disconnected()
        node.metrics.connections.dec()


# ----- HTTP -----


async def index(request: Request) -> Response:
    return FileResponse(WEB_CLIENT / "index.html", media_type="text/html")


async def embed_js(request: Request) -> Response:
    # Pages on other origins load it as a module script, which is fetched with CORS.
    return FileResponse(
        WEB_CLIENT / "embed.js", media_type="text/javascript", headers={"Access-Control-Allow-Origin": "*"}
    )


# Further files of the web client: URL path -> (file in web_client/, media type).
STATIC_FILES = {
    "/app.js": ("app.js", "text/javascript"),
    "/audio.js": ("audio.js", "text/javascript"),
    "/i18n.js": ("i18n.js", "text/javascript"),
    "/admin.js": ("admin.js", "text/javascript"),
    "/style.css": ("style.css", "text/css"),
    "/demo-chat.html": ("demo-chat.html", "text/html"),
    "/admin": ("admin.html", "text/html"),
}


def static_file(name: str, media_type: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return FileResponse(WEB_CLIENT / name, media_type=media_type)

    return endpoint


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    node: Node = request.app.state.node
    ready = node.ready
    return JSONResponse(
        {"ready": ready, "engine": node.engine.name}, status_code=200 if ready else 503
    )


async def metrics(request: Request) -> Response:
    node: Node = request.app.state.node
    return Response(generate_latest(node.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def queue_summary(request: Request) -> Response:
    node: Node = request.app.state.node
    try:
        return JSONResponse(await node.queue_summary())
    except StoreUnavailable as exc:
        body = {"code": "internal", "message": f"{exc}; try again", "retry_after_s": STORE_RETRY_S}
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(round(STORE_RETRY_S))})


async def list_avatars(request: Request) -> Response:
    node: Node = request.app.state.node
    infos = await asyncio.to_thread(node.engine.avatars.list)
    return JSONResponse(
        [
            {"id": a.id, "name": a.name, "frames": a.frames, "width": a.width, "height": a.height, "ready": a.ready}
            for a in infos
        ],
        headers=cors_headers(request, node.settings.server.allowed_origins),
    )


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def create_avatar(request: Request) -> Response:
    """Admin: the request body is the image or video; ``?id=`` and ``?name=`` name the avatar.
    Preparation runs as a low-priority job, one at a time (``AvatarPreparer``); ``202`` with the
    job, whose status and progress ``GET /v1/avatars/{id}`` reports."""
    node: Node = request.app.state.node
    denied = _admin_denied(request, node)
    if denied is not None:
        return denied
    try:
        avatar_id = validate_avatar_id(request.query_params.get("id", ""))
    except InvalidAvatarId as exc:
        return JSONResponse({"code": "bad_message", "message": str(exc)}, status_code=400)
    name = request.query_params.get("name", avatar_id)[:100]
    try:
        received = await receive_avatar_upload(request, node.settings.limits)
    except UploadRefused as refused:
        return JSONResponse({"code": refused.code, "message": refused.message}, status_code=refused.status)
    upload = received.path
    preparer = node.preparer
    assert preparer is not None
    try:
        job = preparer.submit(avatar_id, name, upload)
    except AvatarBusy as exc:
        upload.unlink(missing_ok=True)
        return JSONResponse({"code": "busy", "message": str(exc)}, status_code=409)
    except PreparationsFull as exc:
        upload.unlink(missing_ok=True)
        return JSONResponse(
            {"code": "busy", "message": f"{exc}; try again later"}, status_code=503, headers={"Retry-After": "30"}
        )
    return JSONResponse(
        {"id": avatar_id, "name": name, "status": job.status.value, "ready": False, "job": job_view(job)},
        status_code=202,
        headers={"Location": f"/v1/avatars/{avatar_id}"},
    )


def job_view(job: PreparationJob) -> dict[str, object]:
    view: dict[str, object] = {
        "id": job.id,
        "status": job.status.value,
        "progress": round(job.progress, 3),
        "started_at": job.started_at,
    }
    if job.finished_at is not None:
        view["finished_at"] = job.finished_at
    if job.reason is not None:
        view["reason"] = job.reason
    if job.faces is not None:
        view["faces"] = job.faces.to_json()
    return view


def avatar_view(avatar_id: str, info: AvatarInfo | None, job: PreparationJob | None) -> dict[str, object] | None:
    """``GET /v1/avatars/{id}``: ``preparing`` (with progress), ``ready`` or ``failed`` (with the
    reason); ``None`` when there is no such avatar and no job for it."""
    if info is None and job is None:
        return None
    view: dict[str, object] = {"id": avatar_id, "name": info.name if info else job.name if job else avatar_id}
    if job is not None and job.status is JobStatus.PREPARING:
        view["status"] = "preparing"
        view["progress"] = round(job.progress, 3)
    elif info is not None and info.ready:
        view["status"] = "ready"
        if job is not None and job.status is JobStatus.FAILED:  # a new source failed; the old avatar stays
            view["reason"] = f"the last upload was not used: {job.reason}"
    else:
        view["status"] = "failed"
        view["reason"] = job.reason if job is not None and job.reason else "its data cannot be read"
    view.update(
        frames=info.frames if info else 0, width=info.width if info else 0, height=info.height if info else 0
    )
    if job is not None:
        view["job"] = job_view(job)
    return view


async def get_avatar(request: Request) -> Response:
    node: Node = request.app.state.node
    avatar_id = request.path_params["avatar_id"]
    if not is_avatar_id(avatar_id):
        return JSONResponse({"code": "bad_message", "message": f"invalid avatar id {avatar_id!r}"}, status_code=400)
    store = node.engine.avatars
    info = await asyncio.to_thread(store.info, avatar_id)
    view = avatar_view(avatar_id, info, store.job(avatar_id))
    if view is None:
        return JSONResponse({"code": "unknown_avatar", "message": f"no avatar {avatar_id!r}"}, status_code=404)
    return JSONResponse(view, headers={"Cache-Control": "no-store"})


async def delete_avatar(request: Request) -> Response:
    """Admin: remove the avatar (disk, memory, every worker) and every clip made with it."""
    node: Node = request.app.state.node
    denied = _admin_denied(request, node)
    if denied is not None:
        return denied
    avatar_id = request.path_params["avatar_id"]
    if not is_avatar_id(avatar_id):
        return JSONResponse({"code": "bad_message", "message": f"invalid avatar id {avatar_id!r}"}, status_code=400)
    engine = node.engine
    try:
        removed = await asyncio.to_thread(engine.avatars.delete, avatar_id)
    except AvatarBusy as exc:
        message = f"{exc}; delete it once it is ready or failed"
        return JSONResponse({"code": "busy", "message": message}, status_code=409)
    engine.forget(avatar_id)
    engine.hot.forget(avatar_id)
    clips = await asyncio.to_thread(node.clips.remove_avatar, avatar_id)
    if not removed and clips == 0:
        return JSONResponse({"code": "unknown_avatar", "message": f"no avatar {avatar_id!r}"}, status_code=404)
    return JSONResponse({"id": avatar_id, "deleted": True, "clips_removed": clips})


def _admin_denied(request: Request, node: Node) -> Response | None:
    """None for a request with a verified admin token; else the 401 or 403 to answer."""
    try:
        identity = node.auth.identify(_bearer(request), request.client.host if request.client else "")
    except ProtocolError as err:
        return JSONResponse({"code": err.code.value, "message": err.message}, status_code=401)
    if not identity.is_admin:
        return JSONResponse({"code": "forbidden", "message": "an admin token is required"}, status_code=403)
    return None


def _samples(metric: MetricWrapperBase) -> list[Sample]:
    return [s for family in metric.collect() for s in family.samples if not s.name.endswith("_created")]


async def admin_stats(request: Request) -> Response:
    """Admin: the node at a glance, for the /admin page."""
    node: Node = request.app.state.node
    denied = _admin_denied(request, node)
    if denied is not None:
        return denied
    summary = await node.queue_summary()
    slots: dict[str, int] = summary["slots"]  # type: ignore[assignment]
    m = node.metrics
    return JSONResponse(
        {
            "waiting": summary["tiers"],
            "slots": {**slots, "free": max(0, slots["total"] - slots["busy"])},
            "frames_per_second": round(node.engine.frames_per_second(), 2),
            "clips_served": int(sum(s.value for s in _samples(m.clips_served))),
            "errors": {s.labels["code"]: int(s.value) for s in _samples(m.rejections)},
            "frames_streamed": int(sum(s.value for s in _samples(m.frames))),
            "connections": int(sum(s.value for s in _samples(m.connections))),
            "sessions_active": int(sum(s.value for s in _samples(m.sessions_active))),
            "tickets": node.admission.census(),
            "queued_audio_bytes": node.upload_budget.used_bytes,
            "engine": node.engine.name,
        },
        headers={"Cache-Control": "no-store"},
    )


async def get_clip(request: Request) -> Response:
    """A stored clip: the file with ranges from a local store, the bytes from an object store
    (a CDN in front of the store, ``stream.cdn_base_url``, spares this node those requests)."""
    node: Node = request.app.state.node
    key = request.path_params["key"]
    if not await asyncio.to_thread(node.clips.exists, key):
        return JSONResponse({"code": "not_found", "message": "no such clip"}, status_code=404)
    etag = f'"{key}"'
    headers = {"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable"}
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    node.metrics.clips_served.inc()
    path = node.clips.path(key)
    if path is not None:
        return FileResponse(path, media_type="video/mp4", headers=headers, content_disposition_type="inline")
    found = await asyncio.to_thread(node.clips.read, key)
    if found is None:
        return JSONResponse({"code": "not_found", "message": "no such clip"}, status_code=404)
    return Response(found[0], media_type="video/mp4", headers=headers)


class StreamServerApp:
    """The Starlette app for HTTP, with the session socket dispatched before its middleware stack:
    a waiting client then holds only the frames it needs, which keeps memory per client small."""

    def __init__(self, settings: Settings, engine: ServingEngine | None) -> None:
        self.settings = settings
        self.node: Node | None = None

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            node = Node(settings, engine=engine)
            app.state.node = self.node = node
            await node.start()
            try:
                yield
            finally:
                await node.stop()

        routes = [
            Route("/", index),
            Route("/embed.js", embed_js),
            *[Route(path, static_file(name, media)) for path, (name, media) in STATIC_FILES.items()],
            Route("/v1/admin/stats", admin_stats),
            Route("/v1/avatars", list_avatars, methods=["GET"]),
            Route("/v1/avatars", create_avatar, methods=["POST"]),
            Route("/v1/avatars/{avatar_id}", get_avatar, methods=["GET"]),
            Route("/v1/avatars/{avatar_id}", delete_avatar, methods=["DELETE"]),
            Route("/v1/queue", queue_summary),
            Route("/v1/clips/{key}.mp4", get_clip, methods=["GET", "HEAD"]),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
        ]
        self.http = Starlette(routes=routes, lifespan=lifespan)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            if scope["path"] == "/v1/stream" and self.node is not None:
                await session_socket(WebSocket(scope, receive, send), self.node)
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        await self.http(scope, receive, send)


def create_app(settings: Settings | None = None, *, engine: ServingEngine | None = None) -> StreamServerApp:
    return StreamServerApp(settings or Settings(), engine)
