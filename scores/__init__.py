"""Scores: declarative desired state (what is wanted) and their Interprets (how it is realised).

A Score never talks to the mesh: the agent decides *whether* a Score runs here, the Score's
Interpret only knows *how* to make it so on a Topology.
"""
