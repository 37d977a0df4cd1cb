"""Pictures and reports: heat-map overlays, mask PNGs, the HTML report."""

from .overlay import heatmap_overlay, mask_png, save_png

__all__ = ["heatmap_overlay", "mask_png", "save_png"]
