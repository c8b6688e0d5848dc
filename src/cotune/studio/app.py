"""The studio's web app: the static page (``studio/static``: plain HTML, JS and CSS, nothing fetched from
elsewhere) and the JSON endpoints it reads, each a thin call into ``datasets``, ``runs``, ``review``
and ``chat``.

Every request but ``/health`` carries the access token when one is set (header ``X-Studio-Token``,
the ``studio_token`` cookie the page receives on ``/?token=...``, or ``?token=``); files are read
and written only under ``Folders``.
"""

from __future__ import annotations

import base64
import hmac
import json
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request  # module level: FastAPI reads the routes' annotations here

from cotune.studio.safety import Folders, Refused, picture_png, png_bytes

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 20 * 2**20
MAX_UPLOADS = 32


@dataclass
class Studio:
    """What one studio shows: the folders, data files, runs, review queues and the chat back end."""

    folders: Folders
    data: list = field(default_factory=list)  # datasets.DataView
    runs: list = field(default_factory=list)  # runs.RunView
    queues: list = field(default_factory=list)  # review.ReviewQueue
    chat: Any = None  # chat.LocalChat | chat.ServeChat | None
    token: str = ""
    uploads: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record_by_id(self, record_id: str) -> dict | None:
        for view in self.data:
            try:
                records = view.records()
            except Exception:  # a file that cannot be read shows its error on the Data page
                continue
            for r in records:
                if r["id"] == record_id:
                    return r
        return None


def _pick(items: list, k: int, what: str):
    if not 0 <= k < len(items):
        raise HTTPException(404, f"no {what} {k}")
    return items[k]


def build_app(studio: Studio):
    """The FastAPI app over ``studio``."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI(title="cotune studio", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def token_check(request: Request, call_next):
        if studio.token and request.url.path != "/health":
            given = (
                request.headers.get("x-studio-token")
                or request.cookies.get("studio_token")
                or request.query_params.get("token")
                or ""
            )
            if not hmac.compare_digest(given.encode(), studio.token.encode()):
                return JSONResponse({"error": "access token required (open /?token=TOKEN)"}, status_code=401)
        response = await call_next(request)
        if studio.token and request.query_params.get("token"):
            response.set_cookie("studio_token", studio.token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused):
        return JSONResponse({"error": str(e)}, status_code=403)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    _file_routes(app, studio)
    _data_routes(app, studio)
    _run_routes(app, studio)
    _review_routes(app, studio)
    _chat_routes(app, studio)
    return app


def _file_routes(app, studio: Studio) -> None:
    from fastapi.responses import FileResponse, Response

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/static/{name}")
    def static(name: str):
        if name not in {p.name for p in STATIC.iterdir()}:
            raise HTTPException(404, "no such file")
        return FileResponse(STATIC / name)

    @app.get("/api/overview")
    def overview() -> dict:
        return {
            "data": [str(v.path) for v in studio.data],
            "runs": [r.name for r in studio.runs],
            "queues": [str(q.source) for q in studio.queues],
            "chat": studio.chat.describe() if studio.chat else "",
        }

    @app.get("/api/image/{index}/{rel:path}")
    def image(index: int, rel: str, size: int = 768):
        path = studio.folders.resolve(index, rel)
        if not path.is_file():
            raise HTTPException(404, "no such picture")
        try:
            data = picture_png(path, max(16, min(size, 2048)))
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=600"})


def _data_routes(app, studio: Studio) -> None:
    from fastapi.responses import Response

    @app.get("/api/data/{k}")
    def data(k: int, answer: str = "", problem: str = "", text: str = "", offset: int = 0, limit: int = 50):
        view = _pick(studio.data, k, "data file")
        try:
            records = view.filtered(answer, problem, text)
        except (ValueError, OSError) as e:  # a file training could not read either: say why
            return {"path": str(view.path), "error": str(e), "records": [], "matched": 0}
        limit = max(1, min(limit, 500))
        return {**view.summary(), "matched": len(records), "offset": offset,
                "records": records[offset : offset + limit]}  # fmt: skip

    @app.get("/api/augment/{k}/{index}/{epoch}")
    def augment(k: int, index: int, epoch: int):
        view = _pick(studio.data, k, "data file")
        try:
            picture = view.augmented(index, epoch)
        except KeyError as e:
            raise HTTPException(404, str(e)) from None
        picture.thumbnail((512, 512))
        return Response(png_bytes(picture), media_type="image/png")


def _run_routes(app, studio: Studio) -> None:
    @app.get("/api/runs")
    def runs() -> list:
        return [r.summary() for r in studio.runs]

    @app.get("/api/answers/{k}")
    def answers(k: int, folder: str = "eval") -> dict:
        run = _pick(studio.runs, k, "run")
        try:
            return run.answers(folder, studio.record_by_id)
        except KeyError as e:
            raise HTTPException(404, str(e)) from None


def _review_routes(app, studio: Studio) -> None:
    @app.get("/api/review/{k}")
    def review(k: int) -> dict:
        return _pick(studio.queues, k, "review queue").state()

    @app.post("/api/review/{k}")
    async def decide(k: int, request: Request) -> dict:
        queue = _pick(studio.queues, k, "review queue")
        body = await request.json()
        try:
            return queue.decide(str(body.get("key")), str(body.get("decision")), body.get("reply"))
        except (KeyError, ValueError) as e:
            raise HTTPException(400, str(e)) from None


def _chat_routes(app, studio: Studio) -> None:
    from fastapi.responses import StreamingResponse

    @app.get("/api/chat/models")
    def models() -> dict:
        if studio.chat is None:
            return {
                "models": [],
                "backend": "",
                "why": "no model: give --model_name, a --run with an adapter, or --serve URL",
            }
        try:
            return {"models": studio.chat.names(), "backend": studio.chat.describe()}
        except OSError as e:
            return {"models": [], "backend": studio.chat.describe(), "why": str(e)}

    @app.post("/api/chat/upload")
    async def upload(request: Request) -> dict:
        from cotune.data.images import load_image

        if int(request.headers.get("content-length") or 0) > MAX_UPLOAD_BYTES:  # before reading it
            raise HTTPException(413, f"a picture may be at most {MAX_UPLOAD_BYTES // 2**20} MiB")
        body = await request.body()
        if len(body) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"a picture may be at most {MAX_UPLOAD_BYTES // 2**20} MiB")
        try:
            data = str(json.loads(body).get("data", ""))
            encoded = base64.b64decode(data.split(",", 1)[-1], validate=True)
            picture = load_image(encoded, name="the uploaded picture")
        except (ValueError, AttributeError) as e:  # not JSON, not base64, or the one decoder's reason
            raise HTTPException(422, str(e)) from None
        key = uuid.uuid4().hex[:12]
        with studio._lock:
            while len(studio.uploads) >= MAX_UPLOADS:
                studio.uploads.pop(next(iter(studio.uploads)))
            studio.uploads[key] = picture
        return {"upload": key, "width": picture.width, "height": picture.height}

    @app.post("/api/chat")
    async def chat(request: Request):
        if studio.chat is None:
            raise HTTPException(400, "this studio has no model to chat with")
        body = await request.json()
        picture = _chat_picture(studio, body)
        question, search = str(body.get("question", "")).strip(), str(body.get("search", "none"))
        if not question:
            raise HTTPException(400, "ask a question")
        if search not in ("none", "stage", "best-of-n"):
            raise HTTPException(400, "search must be none, stage or best-of-n")
        names = [str(n) for n in body.get("models", [])] or ["none"]
        lines = chat_lines(studio.chat, names, question, picture, search)
        return StreamingResponse(lines, media_type="application/x-ndjson")


def chat_lines(chat, names: list[str], question: str, picture, search: str):
    """The chat's stream: one JSON line per piece of each model's reply, then its whole reply (or error)."""
    for name in names:
        text = []
        try:
            for piece in chat.answer(question, picture, name, search):
                text.append(piece)
                yield json.dumps({"model": name, "piece": piece}) + "\n"
            yield json.dumps({"model": name, "done": True, "text": "".join(text).strip()}) + "\n"
        except Exception as e:  # one model's failure is shown in its column, the rest go on
            yield json.dumps({"model": name, "error": f"{type(e).__name__}: {e}"}) + "\n"


def _chat_picture(studio: Studio, body: dict):
    """The picture a chat request names: an upload, a picture under the folders, or none."""
    from cotune.data.images import load_image

    if body.get("upload"):
        picture = studio.uploads.get(str(body["upload"]))
        if picture is None:
            raise HTTPException(404, "that upload is gone; upload the picture again")
        return picture
    if body.get("image"):  # "/api/image/K/REL" as the Data page shows it
        parts = str(body["image"]).split("/", 4)
        if len(parts) != 5 or parts[:3] != ["", "api", "image"] or not parts[3].isdigit():
            raise HTTPException(400, "image must be a picture URL of this studio")
        path = studio.folders.resolve(int(parts[3]), parts[4].split("?", 1)[0])
        try:
            return load_image(str(path))
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
    return None
