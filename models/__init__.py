"""Your own networks: a run names one as ``model: "models.<module>:<callable>"`` (see docs/models.md)."""
