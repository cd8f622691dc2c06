"""User interfaces: the Gradio studio (and, later, the arena), mounted on the API server."""
