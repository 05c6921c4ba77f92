"""HTTP-facing layer: request/response models, image transport, and the error -> status mapping."""
