"""Twins of the shared models as other exporters write them: the same network behind another interface or
another spelling of its layers (channels-last or uint8 pixels, BatchNormalization kept, a fixed batch, boxes
and scores before NMS, decoded rows). Each computes what its source computes, so quantizing and scoring it
must give what the source gives; tests and bench/exporter_variants.py build them."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import MODELS_DIR

YOLOV8 = MODELS_DIR / "yolov8n_from-int8_640.onnx"


def fixed_batch(src, dst, batch=4):
    """`src` with its image input and output fixed to `batch` images (its graph must allow it: YOLOX's does)."""
    m = onnx.load(str(src))
    for value in (m.graph.input[0], m.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(m, str(dst))
    return dst


def channels_last(src, dst):
    """`src` with an N,H,W,3 image input transposed to its N,3,H,W one, as TensorFlow and Keras exports read."""
    m = onnx.load(str(src))
    old = m.graph.input[0]
    n, c, h, w = (d.dim_value for d in old.type.tensor_type.shape.dim)
    m.graph.node.insert(0, helper.make_node("Transpose", ["image_nhwc"], [old.name], perm=[0, 3, 1, 2]))
    m.graph.input.remove(old)
    m.graph.input.insert(0, helper.make_tensor_value_info("image_nhwc", TensorProto.FLOAT, [n, h, w, c]))
    onnx.save(m, str(dst))
    return dst


def uint8_pixels(src, dst):
    """`src` taking uint8 pixels N,H,W,3 and scaling them itself (Transpose, Cast, Div by 255), as exports with
    the preprocessing in the graph do."""
    m = onnx.load(str(src))
    old = m.graph.input[0]
    n, c, h, w = (d.dim_value for d in old.type.tensor_type.shape.dim)
    m.graph.initializer.append(helper.make_tensor("k255", TensorProto.FLOAT, [], [255.0]))
    for i, node in enumerate([helper.make_node("Transpose", ["pixels"], ["pixels_nchw"], perm=[0, 3, 1, 2]),
                              helper.make_node("Cast", ["pixels_nchw"], ["pixels_f"], to=TensorProto.FLOAT),
                              helper.make_node("Div", ["pixels_f", "k255"], [old.name])]):
        m.graph.node.insert(i, node)
    m.graph.input.remove(old)
    m.graph.input.insert(0, helper.make_tensor_value_info("pixels", TensorProto.UINT8, [n, h, w, c]))
    onnx.save(m, str(dst))
    return dst


def batch_norms(src, dst):
    """`src` with every biased Conv split into a Conv and a BatchNormalization computing the same (random
    statistics folded back out of its weights), as exports that keep BatchNormalization give it."""
    m = onnx.load(str(src))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    rng = np.random.default_rng(0)
    nodes = []
    for node in g.node:
        nodes.append(node)
        if node.op_type != "Conv" or len(node.input) != 3 or node.input[2] not in inits:
            continue
        w, b = (numpy_helper.to_array(inits[n]) for n in node.input[1:])
        c = w.shape[0]
        gamma, var, mean = (rng.uniform(lo, hi, c).astype(np.float32) for lo, hi in ((0.5, 1.5), (0.5, 2.0), (-0.5, 0.5)))
        gain = gamma / np.sqrt(var + 1e-3)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array((w / gain[:, None, None, None]).astype(np.float32),
                                                              node.input[1]))
        names = [f"{node.name}_bn_{k}" for k in "gbmv"]
        g.initializer.extend(numpy_helper.from_array(a, n) for n, a in zip(names, (gamma, b + mean * gain, mean, var)))
        out = node.output[0]
        node.output[0] = f"{out}_conv"
        del node.input[2]
        nodes.append(helper.make_node("BatchNormalization", [node.output[0]] + names, [out], epsilon=1e-3))
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(m, str(dst))
    return dst


def yolov8_head(g):
    """yolov8n's output as boxes [1, 8400, 4] x1, y1, x2, y2 and scores [1, 80, 8400]."""
    i64 = lambda name, v: helper.make_tensor(name, TensorProto.INT64, [len(v)], v)  # noqa: E731
    g.initializer.extend([i64("c0", [0]), i64("c2", [2]), i64("c4", [4]), i64("c84", [84]), i64("ax2", [2]),
                          i64("shape_k4", [-1, 4]), i64("shape_flat", [-1]), i64("n_boxes", [8400]),
                          i64("col1", [1]), i64("col2", [2]), i64("max_per_class", [300]),
                          helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
                          helper.make_tensor("iou_thr", TensorProto.FLOAT, [1], [0.7]),
                          helper.make_tensor("score_thr", TensorProto.FLOAT, [1], [0.001])])
    raw = g.output[0].name
    return [
        helper.make_node("Transpose", [raw], ["pred"], perm=[0, 2, 1]),
        helper.make_node("Slice", ["pred", "c0", "c2", "ax2"], ["xy"]),
        helper.make_node("Slice", ["pred", "c2", "c4", "ax2"], ["wh"]),
        helper.make_node("Slice", ["pred", "c4", "c84", "ax2"], ["cls"]),
        helper.make_node("Transpose", ["cls"], ["scores"], perm=[0, 2, 1]),
        helper.make_node("Mul", ["wh", "half"], ["half_wh"]),
        helper.make_node("Sub", ["xy", "half_wh"], ["x1y1"]),
        helper.make_node("Add", ["xy", "half_wh"], ["x2y2"]),
        helper.make_node("Concat", ["x1y1", "x2y2"], ["boxes"], axis=2),
        helper.make_node("NonMaxSuppression", ["boxes", "scores", "max_per_class", "iou_thr", "score_thr"],
                         ["selected"]),
        # the selected boxes' class, box index, score
        helper.make_node("Gather", ["selected", "col1"], ["sel_cls2d"], axis=1),
        helper.make_node("Gather", ["selected", "col2"], ["sel_box2d"], axis=1),
        helper.make_node("Reshape", ["sel_cls2d", "shape_flat"], ["sel_cls"]),
        helper.make_node("Reshape", ["sel_box2d", "shape_flat"], ["sel_box"]),
        helper.make_node("Mul", ["sel_cls", "n_boxes"], ["cls_base"]),
        helper.make_node("Add", ["cls_base", "sel_box"], ["flat_idx"]),
        helper.make_node("Reshape", ["scores", "shape_flat"], ["scores_flat"]),
        helper.make_node("Gather", ["scores_flat", "flat_idx"], ["det_score"]),  # [K]
        helper.make_node("Cast", ["sel_cls"], ["det_cls_f"], to=TensorProto.FLOAT),  # [K]
    ]


def yolov8_boxes_scores(corners: bool):
    """yolov8n's candidates before NMS as two outputs: corners [1, 8400, 4] in pixels and probabilities
    [1, 80, 8400] (PP-YOLOE's order), or centre and size normalised to [0, 1] and logits [1, 8400, 80]."""
    m = onnx.load(str(YOLOV8))
    g = m.graph
    nodes = yolov8_head(g)[:9]  # up to boxes and scores, before the NMS
    g.initializer.extend([helper.make_tensor("size", TensorProto.FLOAT, [], [640.0]),
                          helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    if corners:
        outputs = [("boxes", [1, 8400, 4]), ("scores", [1, 80, 8400])]
    else:
        nodes += [helper.make_node("Concat", ["xy", "wh"], ["xywh"], axis=2),
                  helper.make_node("Div", ["xywh", "size"], ["boxes_01"]),
                  helper.make_node("Sub", ["one", "cls"], ["not_cls"]),
                  helper.make_node("Div", ["cls", "not_cls"], ["odds"]),
                  helper.make_node("Log", ["odds"], ["logits"])]
        outputs = [("logits", [1, 8400, 80]), ("boxes_01", [1, 8400, 4])]
    g.node.extend(nodes)
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs])
    onnx.checker.check_model(m)
    return m


def yolox_decoded():
    """yolox_nano with its boxes decoded in the graph (centre = (offset + cell) * stride, size = exp * stride),
    the [1, 3549, 85] rows YOLOv6 and YOLOX's decode_in_inference export."""
    m = onnx.load(str(MODELS_DIR / "yolox_nano_416.onnx"))
    g = m.graph
    cells = [np.divmod(np.arange((416 // s) ** 2), 416 // s) + (np.full((416 // s) ** 2, s),) for s in (8, 16, 32)]
    grid = np.stack([np.concatenate([x for _, x, _ in cells]), np.concatenate([y for y, _, _ in cells])], 1)
    stride = np.concatenate([s for *_, s in cells])
    g.initializer.extend([numpy_helper.from_array(grid[None].astype(np.float32), "grid"),
                          numpy_helper.from_array(stride[None, :, None].astype(np.float32), "stride")]
                         + [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in
                            (("c0", 0), ("c2", 2), ("c4", 4), ("c85", 85), ("ax2", 2))])
    raw = g.output[0].name
    g.node.extend([helper.make_node("Slice", [raw, "c0", "c2", "ax2"], ["dxy"]),
                   helper.make_node("Slice", [raw, "c2", "c4", "ax2"], ["log_wh"]),
                   helper.make_node("Slice", [raw, "c4", "c85", "ax2"], ["obj_cls"]),
                   helper.make_node("Add", ["dxy", "grid"], ["cell_xy"]),
                   helper.make_node("Mul", ["cell_xy", "stride"], ["xy"]),
                   helper.make_node("Exp", ["log_wh"], ["exp_wh"]),
                   helper.make_node("Mul", ["exp_wh", "stride"], ["wh"]),
                   helper.make_node("Concat", ["xy", "wh", "obj_cls"], ["decoded"], axis=2)])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("decoded", TensorProto.FLOAT, [1, 3549, 85]))
    onnx.checker.check_model(m)
    return m
