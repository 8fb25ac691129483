"""Detections of one prepared batch, decoded and suppressed under each scoring protocol."""

import numpy as np

from .decoders import decode_protocols
from .families import PADDLE_INPUTS
from .nms import CONF_THRESHOLD, IOU_THRESHOLD, MAX_DETECTIONS, PROTOCOLS, nms


def image_inputs(inputs, batch, skip=()) -> dict:
    """Per-image values of the resize inputs of Paddle exports (scale_factor = [h_in/h0, w_in/w0], im_shape =
    the resized [h, w]), which map the boxes back to the original picture inside the graph."""
    out = {}
    for name in PADDLE_INPUTS:
        const = inputs.extras.get(name)
        if const is None or name in skip or const.ndim != 2 or const.shape[1] != 2:
            continue
        rows = []
        for t in batch.transforms:
            (gx, gy), (h, w) = t.gain, t.orig_hw
            rows.append([gy, gx] if name == "scale_factor" else [round(h * gy), round(w * gx)])
        out[name] = np.asarray(rows, dtype=const.dtype)
    return out


def detect_batch(runner, family, inputs, batch, conf=CONF_THRESHOLD, ious=None, max_det=MAX_DETECTIONS,
                 protocols=tuple(PROTOCOLS), skip_inputs=()) -> dict:
    """{protocol: [(boxes_xyxy, scores, classes) per image, in original-image pixels]} from one run of the
    model over a prepared Batch. ious: {protocol: IoU} over each protocol's own."""
    outputs = runner({**inputs.feed(batch.images), **image_inputs(inputs, batch, skip_inputs)})
    decoded = decode_protocols(family, outputs, inputs.hw, conf, len(batch.paths), protocols)
    results = {}
    for name, per_image in decoded.items():
        iou = (ious or {}).get(name, PROTOCOLS[name].iou)
        rows = []
        for (boxes, scores, classes), transform in zip(per_image, batch.transforms):
            if family.nms_in_graph:  # the graph already suppressed: only cap the count
                keep = np.argsort(-scores, kind="stable")[:max_det]
            else:
                keep = nms(boxes, scores, classes, iou, max_det)
            b = boxes[keep]
            if family.original_boxes:  # already in original pixels: the round trip only clips them
                b = transform.to_input(b)
            rows.append((transform.to_original(b), scores[keep], classes[keep]))
        results[name] = rows
    return results


def detect_image(runner, family, inputs, batch, conf=CONF_THRESHOLD, iou=IOU_THRESHOLD, max_det=MAX_DETECTIONS,
                 protocol="val"):
    """Detections of one prepared Batch in original-image pixels: [(boxes_xyxy, scores, classes), ...]."""
    ious = {protocol: iou} if protocol == "val" else None
    return detect_batch(runner, family, inputs, batch, conf, ious, max_det, (protocol,))[protocol]
