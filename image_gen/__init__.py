"""image-gen: a self-hostable text-to-image platform (CLI, REST API, studio, workers) over `pipelines` and `storage`."""

__version__ = "0.1.0"
