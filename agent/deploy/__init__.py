"""Deployment artefacts generated from typed models: Kubernetes manifests, NATS configs.

ADR 018 prefers typed manifests to templating: every object is built from a dataclass or a
pydantic model and rendered to YAML at the end, so a missing field is a type error, not a
silently broken template.
"""
