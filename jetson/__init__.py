"""Jetson-side helpers: L4T/JetPack detection, tegrastats power logging, the on-device benchmark matrix."""
