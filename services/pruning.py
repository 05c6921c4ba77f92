"""Early pruning on free previews (pure functions): see `hidream_serve.scoring.pruning`, shared with
`hidream-serve calibrate-pruning` so the calibration ranks exactly as the service prunes."""

from hidream_serve.scoring.pruning import stage_steps, survivors

__all__ = ["stage_steps", "survivors"]
