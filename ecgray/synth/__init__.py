"""The embedded synthetic PTB-XL + ECG-QA world (`ecgray synth`): a cardiac-dipole signal model driven by
real PTB-XL label co-occurrence, written in the real file formats so the real-data path is the only path."""

from ecgray.synth.world import generate_world

__all__ = ["generate_world"]
