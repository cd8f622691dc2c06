"""Submitting a generation for a caller (generation rate, concurrent-job quota, webhook target, then the service),
and waiting for it on behalf of the synchronous endpoints."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from image_gen.errors import ImageGenError
from image_gen.limits import ConcurrencyQuota, RateLimiter
from image_gen.service import GenerationService
from image_gen.settings import Settings
from image_gen.webhooks import WebhookDispatcher
from pipelines.params import GenerationParams
from storage.queue import Job

if TYPE_CHECKING:
    from image_gen.api.deps import Caller

POLL_S = 0.1


class Submission:
    """The one way a request becomes a job."""

    def __init__(
        self,
        service: GenerationService,
        settings: Settings,
        limiter: RateLimiter,
        quota: ConcurrencyQuota,
        webhooks: WebhookDispatcher,
    ) -> None:
        self.service = service
        self.settings = settings
        self.limiter = limiter
        self.quota = quota
        self.webhooks = webhooks

    def submit(
        self,
        caller: Caller,
        params: GenerationParams,
        *,
        idempotency_key: str | None = None,
        priority: int = 0,
        output_format: str = "png",
        webhook_url: str | None = None,
        best_of: int | None = None,
    ) -> Job:
        """Validate against the model, check the target of the webhook, take a generation token and a quota slot,
        queue the job and register its webhook. Bad input is refused before any limit is charged."""
        resolved = self.service.resolve(params)
        if best_of is not None:
            self.service.check_best_of(best_of, resolved.num_images)
        self._check_cost(resolved, best_of)
        if webhook_url is not None:
            self.webhooks.check(webhook_url)
        key = caller.key
        rate = (
            key.rate_per_minute if key and key.rate_per_minute is not None else self.settings.rate_per_minute
        )
        limit = key.max_concurrent if key and key.max_concurrent is not None else self.settings.max_concurrent
        self.limiter.take(f"generations:{caller.owner}", rate, "generation requests")
        with self.quota.slot(caller.owner, limit) as bind:
            job = self.service.submit(
                caller.owner,
                resolved,
                idempotency_key=idempotency_key,
                priority=priority,
                output_format=output_format,
                webhook_url=webhook_url,
                best_of=best_of,
            )
            bind(job.id)
        if webhook_url is not None:
            self.webhooks.register(job, webhook_url)
        return job

    def _check_cost(self, params: GenerationParams, best_of: int | None = None) -> None:
        """The operator's caps on the work one request may ask for (max_steps, max_images; best_of candidates
        count as images)."""
        settings = self.settings
        assert params.steps is not None
        if params.steps > settings.max_steps:
            raise ImageGenError(
                f"steps {params.steps} is over this server's limit of {settings.max_steps}", param="steps"
            )
        if params.num_images > settings.max_images:
            raise ImageGenError(
                f"{params.num_images} images is over this server's limit of {settings.max_images}", param="n"
            )
        if best_of is not None and best_of > settings.max_images:
            raise ImageGenError(
                f"best_of {best_of} candidates is over this server's limit of {settings.max_images} images",
                param="best_of",
            )

    async def generate(
        self, caller: Caller, params: GenerationParams, output_format: str = "png", best_of: int | None = None
    ) -> Job:
        """Submit and wait up to `request_timeout_s` for the job to succeed; a failure, cancellation or timeout is
        an error that names the job."""
        job = await asyncio.to_thread(
            self.submit, caller, params, output_format=output_format, best_of=best_of
        )
        timeout = self.settings.request_timeout_s
        deadline = time.monotonic() + timeout
        while not job.finished and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            job = await asyncio.to_thread(self.service.job, caller.owner, job.id)
        if job.status == "succeeded":
            return job
        if job.status == "canceled":
            raise ImageGenError(f"job {job.id} was canceled", code="canceled")
        if job.status == "failed":
            raise ImageGenError(
                f"job {job.id} failed: {job.error or 'no error text'}", code="generation_failed"
            )
        raise ImageGenError(
            f"job {job.id} is still {job.status} after {timeout:g} s: it goes on; poll GET /v1/jobs/{job.id}",
            code="timeout",
        )
