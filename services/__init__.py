"""Ray Serve deployments of hidream-serve: router (HTTP ingress), generator replicas, scorer; `app.build_app`."""
