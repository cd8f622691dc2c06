"""Storage layer: object stores (local directory or S3), the job queue over them, and PNG metadata."""
