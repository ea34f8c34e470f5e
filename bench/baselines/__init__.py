"""The systems the bridge is measured against, each a small program of its own.

They are what a user could run instead of the bridge: the same HTTP stack with
no MQTT (the ceiling), the obvious Litestar + paho handler, a Node-RED flow.
"""
