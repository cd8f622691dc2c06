"""The REST API: FastAPI routes, one module per resource under `image_gen.api.routes`."""
