"""Async image jobs: submit (202), list, get, cancel, and live progress as Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse, StreamingResponse

from image_gen.api.deps import Owner, Service
from image_gen.api.schemas import JobList, JobRequest, JobView
from storage.queue import STATUSES

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
StatusFilter = Literal[STATUSES]  # type: ignore[valid-type]


@router.post("", status_code=202, response_model=JobView)
def submit_job(
    body: JobRequest,
    service: Service,
    owner: Owner,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    job = service.submit(
        owner,
        body.generation_params(),
        idempotency_key=idempotency_key,
        priority=body.priority,
        output_format=body.output_format,
        webhook_url=body.webhook_url,
    )
    view = JobView.of(job, service.position(job))
    return JSONResponse(
        view.model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"}
    )


@router.get("", response_model=JobList)
def list_jobs(
    service: Service,
    owner: Owner,
    status: StatusFilter | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=1100)] = None,
) -> JobList:
    page = service.jobs(owner, status=status, limit=limit, cursor=cursor)
    return JobList(data=[JobView.of(job) for job in page.jobs], next_cursor=page.next_cursor)


@router.get("/{job_id}", response_model=JobView)
def get_job(job_id: str, service: Service, owner: Owner) -> JobView:
    job = service.job(owner, job_id)
    return JobView.of(job, service.position(job))


@router.post("/{job_id}/cancel", response_model=JobView)
def cancel_job(job_id: str, service: Service, owner: Owner) -> JobView:
    return JobView.of(service.cancel(owner, job_id))


@router.get("/{job_id}/events")
async def job_events(job_id: str, service: Service, owner: Owner) -> StreamingResponse:
    """`queued` (with the queue position), `progress` (step i of N with a preview), then `done` or `failed`."""
    service.job(owner, job_id)

    async def events() -> AsyncIterator[str]:
        version = -1
        while True:
            job = await asyncio.to_thread(service.job, owner, job_id)
            if job.version != version:
                version = job.version
                view = JobView.of(job, await asyncio.to_thread(service.position, job), with_preview=True)
                kind = {"queued": "queued", "running": "progress", "succeeded": "done"}.get(
                    job.status, "failed"
                )
                yield f"event: {kind}\ndata: {json.dumps(view.model_dump(mode='json'))}\n\n"
                if job.finished:
                    return
            await asyncio.sleep(0.2)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
