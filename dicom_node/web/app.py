"""The operations web UI and API (FastAPI, server-rendered Jinja2 templates).

Pages: / (dashboard), /jobs (each job's stage timeline), /jobs/{key} (priors and why, overlay,
findings, delivery, worklist, audit rows, Retry). JSON: /status, /readyz, /healthz; /metrics for
Prometheus. Access rules: auth.py.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .. import audit
from ..config import Settings
from ..index import Index
from ..logs import log_event
from ..pipeline.jobs import STAGES, JobStore
from . import ops
from .auth import COOKIE, OPEN_PATHS, TokenSource
from .metrics import IndexCollector, StageHistogramCollector
from .readiness import ReadinessChecker

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"


def _utc(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} s" if value < 100 else f"{value / 60:.1f} min"


def create_app(settings: Settings, index: Index, tokens: TokenSource, process_registry: CollectorRegistry) -> FastAPI:
    app = FastAPI(title="dicom-node operations", docs_url=None, redoc_url=None, openapi_url=None)
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.filters["utc"] = _utc
    templates.env.filters["seconds"] = _seconds
    templates.env.globals["STAGES"] = STAGES
    jobs = JobStore(index)
    readiness = ReadinessChecker(settings, index)
    gauges = CollectorRegistry()
    gauges.register(IndexCollector(index))
    gauges.register(StageHistogramCollector(index))
    app.state.readiness = readiness

    def render(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
        context.update(ae_title=settings.ae_title, token_required=tokens.configured, now=time.time())
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if not tokens.configured or request.url.path in OPEN_PATHS:
            return await call_next(request)
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() == "bearer" and tokens.accepts(presented.strip()):
            return await call_next(request)
        if tokens.accepts_session(request.cookies.get(COOKIE, "")):
            return await call_next(request)
        if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
            return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
        return JSONResponse({"error": "a bearer token is required: Authorization: Bearer <token from http_token_file>"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    # --- open endpoints ---------------------------------------------------------------------

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        result = readiness.run()
        return JSONResponse(result.to_dict(), status_code=200 if result.ready else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(process_registry) + generate_latest(gauges), media_type=CONTENT_TYPE_LATEST)

    @app.get("/static/style.css")
    def style() -> FileResponse:
        return FileResponse(TEMPLATES / "style.css", media_type="text/css")

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/") -> HTMLResponse:  # noqa: A002 (the query name)
        return render(request, "login.html", next=_local(next), error="")

    @app.post("/login")
    def login(request: Request, token: str = Form(""), next: str = Form("/")) -> Response:  # noqa: A002
        if not tokens.configured:
            return RedirectResponse(_local(next), status_code=303)
        if not tokens.accepts(token.strip()):
            log_event(log, logging.WARNING, "http.login_refused", peer=request.client.host if request.client else "")
            return render(request, "login.html", status_code=401, next=_local(next), error="That token is not the one configured.")
        response = RedirectResponse(_local(next), status_code=303)
        response.set_cookie(COOKIE, tokens.session_value(), httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
        return response

    @app.post("/logout")
    def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # --- pages ------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    def dashboard(request: Request) -> HTMLResponse:
        return render(request, "dashboard.html", board=ops.dashboard(settings, index))

    @app.get("/jobs", response_class=HTMLResponse)
    def job_list(request: Request, state: str | None = None, limit: int = 100) -> HTMLResponse:
        rows = jobs.list(min(max(limit, 1), 1000), state or None)
        return render(request, "jobs.html", rows=[(job, ops.timeline(job)) for job in rows], state=state or "",
                      states=sorted(jobs.counts()))

    @app.get("/jobs/{key}", response_class=HTMLResponse)
    def job_detail(request: Request, key: str, retried: int = 0) -> HTMLResponse:
        job = jobs.get(key)
        if job is None:
            return render(request, "missing.html", status_code=404, what=f"job {key}")
        page = ops.job_page(settings, index, job)
        # The page shows the patient's studies and findings: a PHI access like `dicom-node priors`.
        audit.record_access(index, audit.OPERATOR_VIEW, job.study_uid,
                            peer=f"http {request.client.host}" if request.client else "http",
                            detail=f"job page {key}")
        return render(request, "job.html", page=page, retried=bool(retried))

    @app.get("/jobs/{key}/overlay.png")
    def overlay(key: str) -> Response:
        job = jobs.get(key)
        path = ops.overlay_path(settings, job) if job else None
        if path is None:
            return JSONResponse({"error": f"no overlay for job {key}"}, status_code=404)
        return FileResponse(path, media_type="image/png")

    @app.post("/jobs/{key}/retry")
    def retry(request: Request, key: str) -> Response:
        from ..pipeline.app import configure
        from ..pipeline.tasks import reset_job

        configure(settings)  # the wake-up goes to this node's broker
        job = reset_job(jobs, key)
        if job is None:
            return render(request, "missing.html", status_code=404, what=f"job {key}")
        log_event(log, logging.INFO, "job.retried", job=key, by="web", peer=request.client.host if request.client else "")
        return RedirectResponse(f"/jobs/{quote(key)}?retried=1", status_code=303)

    @app.get("/status")
    def status() -> JSONResponse:
        from .status import status_document

        return JSONResponse(_jsonable(status_document(index)))

    return app


def _local(target: str) -> str:
    """Only redirect within this site (no open redirect through ?next=)."""
    return target if target.startswith("/") and not target.startswith("//") else "/"


def _jsonable(value):
    import json

    return json.loads(json.dumps(value, default=str))
