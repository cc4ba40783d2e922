"""Serving the registered champions with Ray Serve (flyray.serve.app), following the alias."""
