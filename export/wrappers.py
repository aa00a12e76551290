"""The exported towers' tensor names; the towers themselves are engine.towers (cn_clip restated for export)."""
from engine.towers import PAD_ID, TextTower, VisionTower

VISION_INPUT, VISION_OUTPUT = "pixel_values", "image_embeds"
TEXT_INPUT, TEXT_OUTPUT = "input_ids", "text_embeds"

__all__ = ["PAD_ID", "TEXT_INPUT", "TEXT_OUTPUT", "VISION_INPUT", "VISION_OUTPUT", "TextTower", "VisionTower"]
