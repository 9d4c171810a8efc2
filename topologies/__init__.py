"""Topologies (where things run) and the Capability protocols they provide.

A Topology knows nothing of Scores or of the mesh: it only exposes capabilities such as
running a process or talking to a Kubernetes API.
"""
