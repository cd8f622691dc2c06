"""The models of the registry, in OpenAI's list shape with our details."""

from __future__ import annotations

from fastapi import APIRouter

from image_gen.api.deps import Service

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models")
def list_models(service: Service) -> dict:
    data = []
    for info in service.models():
        data.append(
            {
                "id": info.name,
                "object": "model",
                "created": 0,
                "owned_by": "image-gen",
                "architecture": info.architecture,
                "label": info.label,
                "description": info.description,
                "native_size": info.native_size,
                "allowed_sizes": info.allowed_sizes,
                "default_scheduler": info.default_scheduler,
                "default_steps": info.default_steps,
                "default_guidance": info.default_guidance,
                "presets": info.presets,
                "content_hash": info.content_hash,
            }
        )
    return {"object": "list", "data": data}
