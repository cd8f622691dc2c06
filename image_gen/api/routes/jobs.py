"""Async image jobs: submit (202), list, get, cancel, live progress as Server-Sent Events, and the job's webhook."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Path, Query
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from image_gen.api.deps import CurrentCaller, Service, Submit, Webhooks, read_store
from image_gen.api.errors import ERROR_RESPONSES
from image_gen.api.schemas import JobList, JobRequest, JobView, WebhookRecord
from image_gen.errors import ImageGenError
from image_gen.service import GenerationService
from storage.queue import Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)
StatusFilter = Literal["queued", "running", "succeeded", "failed", "canceled"]
JobId = Annotated[str, Path(max_length=200)]
EVENT_POLL_S = 0.2
KEEPALIVE_S = 15.0


@router.post("", status_code=202, response_model=JobView)
def submit_job(
    body: JobRequest,
    caller: CurrentCaller,
    service: Service,
    submit: Submit,
    idempotency_key: Annotated[
        str | None,
        Header(max_length=200, description="the same key returns the first job instead of a new one"),
    ] = None,
) -> JSONResponse:
    """Queue a generation and return at once; follow it with GET /v1/jobs/{id} or its events."""
    job = submit.submit(
        caller,
        body.generation_params(service),
        idempotency_key=idempotency_key,
        priority=body.priority,
        output_format=body.output_format,
        webhook_url=body.webhook_url,
        best_of=body.best_of,
    )
    view = JobView.of(job, service.position(job))
    return JSONResponse(
        view.model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"}
    )


@router.get("", response_model=JobList)
def list_jobs(
    caller: CurrentCaller,
    service: Service,
    status: StatusFilter | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=1100)] = None,
) -> JobList:
    """The caller's jobs: queued ones in the order they will run, then the rest newest first."""
    page = service.jobs(caller.owner, status=status, limit=limit, cursor=cursor)
    return JobList(
        data=[JobView.of(job, images=service.images_of(caller.owner, job)) for job in page.jobs],
        next_cursor=page.next_cursor,
    )


@router.get("/{job_id}", response_model=JobView)
async def get_job(job_id: JobId, caller: CurrentCaller, service: Service) -> Response:
    # The route clients poll, kept off the thread pool where the store allows: a `def` route would take two hops,
    # one to run and one to validate what it returns against response_model; this view is serialised as it is.
    job, position = await read_store(service, _job_and_position, service, caller.owner, job_id)
    if job.status == "succeeded" and service.best_of(job) is not None:  # ranked by CLIP on its first read
        images = await run_in_threadpool(service.images_of, caller.owner, job)
    else:
        images = service.images_of(caller.owner, job)
    view = JobView.of(job, position, images=images)
    return Response(view.model_dump_json(), media_type="application/json")


def _job_and_position(service: GenerationService, owner: str, job_id: str) -> tuple[Job, int | None]:
    job = service.job(owner, job_id)
    return job, service.position(job)


@router.post("/{job_id}/cancel", response_model=JobView)
def cancel_job(job_id: JobId, caller: CurrentCaller, service: Service) -> JobView:
    """Cancel: a queued job at once, a running one within a denoising step."""
    return JobView.of(service.cancel(caller.owner, job_id))


@router.get("/{job_id}/webhook", response_model=WebhookRecord)
def job_webhook(job_id: JobId, caller: CurrentCaller, service: Service, webhooks: Webhooks) -> WebhookRecord:
    """The job's webhook and every delivery attempt so far."""
    service.job(caller.owner, job_id)
    record = webhooks.record(job_id)
    if record is None:
        raise ImageGenError(f"job {job_id!r} has no webhook", param="id", code="not_found")
    return WebhookRecord.model_validate(record)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}},
)
async def job_events(job_id: JobId, caller: CurrentCaller, service: Service) -> StreamingResponse:
    """Server-Sent Events: `queued` (with the queue position), `progress` (step i of N with a preview), then
    `done`, `failed` or `canceled`; each carries the job as GET /v1/jobs/{id} shows it."""
    await asyncio.to_thread(service.job, caller.owner, job_id)

    async def events() -> AsyncIterator[str]:
        version, last_sent = -1, time.monotonic()
        while True:
            job = await asyncio.to_thread(service.job, caller.owner, job_id)
            if job.version != version:
                version = job.version
                view = JobView.of(
                    job,
                    await asyncio.to_thread(service.position, job),
                    with_preview=True,
                    images=await asyncio.to_thread(service.images_of, caller.owner, job),
                )
                kind = {"queued": "queued", "running": "progress", "succeeded": "done"}.get(
                    job.status, job.status
                )
                yield f"event: {kind}\ndata: {json.dumps(view.model_dump(mode='json'))}\n\n"
                last_sent = time.monotonic()
                if job.finished:
                    return
            elif time.monotonic() - last_sent > KEEPALIVE_S:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
            await asyncio.sleep(EVENT_POLL_S)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
