"""The bundle stage: checked artifacts to a deployable folder with manifest, scripts and README."""
