"""COCO evaluation: output-layout families, decoders, NMS, pycocotools scoring."""
