"""The weather rules read (contract §3, §8): `none`, `static` or `open-meteo`.

A decision reads the weather from an in-process copy, never from the network: a ping never
waits for a weather service. With Open-Meteo a background loop keeps that copy fresh for the
~0.1° cells of the stores, shared by all instances through the state store.
"""
