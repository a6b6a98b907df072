"""clip_fabric: distributed CLIP batch inference on Lightning Fabric."""

__version__ = "0.1.0"
