"""Names of the exported towers' input and output tensors (the towers themselves are engine.towers)."""

VISION_INPUT, VISION_OUTPUT = "pixel_values", "image_embeds"
TEXT_INPUT, TEXT_OUTPUT = "input_ids", "text_embeds"
