"""The quantize path's shape: one validated config, stages that hand frozen values on, registries that the
CLI's choices come from, no import cycle and no long function."""

import ast
import dataclasses
from pathlib import Path

import pytest

from conftest import MODELS_DIR
from onnxq.config import QuantConfig
from onnxq.errors import UsageError

PACKAGE = Path(__file__).resolve().parents[1] / "onnxq"
# the modules a quantize run goes through, stage by stage
QUANTIZE_PATH = ["api.py", "config.py", "pipeline.py", "prepare.py", "request.py", "derived.py", "choose.py",
                 "depthwise.py", "ranges.py", "spec.py", "correct.py", "report.py", "verify.py", "repair.py",
                 "passes/select.py", "passes/qdq.py", "passes/regions.py", "weight_inputs.py"]


def test_the_config_resolves_each_default_from_the_target_and_bits_once():
    trt = QuantConfig.make(target="tensorrt")
    assert trt.symmetric and trt.overflow_fix == "none" and trt.weights == "minmax"
    low = QuantConfig.make(w_bits=4, a_bits=8)
    assert low.weights == "gptq" and not low.symmetric and low.overflow_fix == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        low.method = "minmax"


@pytest.mark.parametrize("options,flag", [
    ({"method": "kl"}, "--method"), ({"w_bits": 5}, "bits"), ({"target": "tpu"}, "--target"),
    ({"overflow_fix": "some"}, "--overflow-fix"), ({"target": "tensorrt", "symmetric": False}, "symmetric"),
    ({"weights": "adaround"}, "--weights"), ({"percentile": 100.0}, "--percentile"),
    ({"bias_correction": -1}, "--bias-correction"), ({"min_agreement": 101}, "--min-agreement"),
    ({"max_float": 0}, "--max-float"),
])
def test_the_config_refuses_a_bad_option_with_its_flag(options, flag):
    with pytest.raises(UsageError, match=flag):
        QuantConfig.make(**options)


def test_an_unknown_option_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="biascorrection"):
        QuantConfig.make(biascorrection=3)


def test_a_placement_is_frozen_once_made():
    from onnxq.api import prepare_model
    from onnxq.passes.select import plan_quantization
    from onnxq.targets import get_target

    plan = plan_quantization(prepare_model(MODELS_DIR / "nanodet_m_320.onnx").graph, get_target("ort"))
    site = next(iter(plan.activations.values()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.share = "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.float_nodes = {}
    with pytest.raises(TypeError):
        plan.float_nodes["conv"] = "why"
    assert isinstance(site.merge, tuple) and plan.target == "ort"


def test_every_range_method_the_cli_offers_has_a_search_and_every_target_a_runtime():
    from onnxq.backends import BACKENDS, RUNTIMES
    from onnxq.choices import RANGE_METHODS
    from onnxq.ranges import RANGE_METHODS as SEARCHES
    from onnxq.targets import TARGETS

    assert list(RANGE_METHODS) == list(SEARCHES)
    for target in TARGETS.values():
        # verification runs the model where the target's runtime can run here (TensorRT's QDQ model on ort)
        assert target.runtime in RUNTIMES and target.runtime in BACKENDS, target.name


def _imports(path: Path, module: str) -> set:
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = f"{base}.{node.module}" if node.module else base
            out.update({f"{target}.{a.name}" for a in node.names} | {target})
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onnxq"):
            out.update({f"{node.module}.{a.name}" for a in node.names} | {node.module})
    return out


def test_no_import_cycle_in_the_package_lazy_imports_included():
    modules = {}
    for p in PACKAGE.rglob("*.py"):
        name = ".".join(("onnxq",) + p.relative_to(PACKAGE).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = p
    edges = {m: {t for t in _imports(p, m) if t in modules and t != m and not m.startswith(t + ".")}
             for m, p in modules.items()}
    cycles = []

    def walk(m, path, done):
        for t in edges[m]:
            if t in path:
                cycles.append(path[path.index(t):] + [t])
            elif t not in done:
                done.add(t)
                walk(t, path + [t], done)

    for m in sorted(modules):
        walk(m, [m], {m})
    assert not cycles, cycles[0]


def test_no_function_of_the_quantize_path_runs_past_about_60_lines():
    long = []
    for rel in QUANTIZE_PATH:
        for node in ast.walk(ast.parse((PACKAGE / rel).read_text())):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 65:
                long.append(f"{rel}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_one_reader_of_qdq_models_sees_the_grid_and_the_quantized_weights():
    """compare, its plots and `build --backend ort` read QDQ models through onnxq.qdq_model: a W4A4 model's
    activations sit on 16 levels behind their Clip, and every quantized conv's weight is found."""
    from conftest import CALIB_DIR
    from onnxq.api import quantize_with_report
    from onnxq.qdq_model import activation_pairs, dequantized_weights

    q, report = quantize_with_report(MODELS_DIR / "nanodet_m_320.onnx", CALIB_DIR / "images", num_images=4,
                                     w_bits=4, a_bits=4, weights="minmax", bias_correction=0, verify=False)
    pairs = activation_pairs(q)
    assert pairs and all(p.qmax - p.qmin == 15 for p in pairs.values())
    assert {c.tensor for c in report.activations} <= set(pairs) | {t for t in report.float_tensors}
    assert set(dequantized_weights(q)) == {w["node"] for w in report.weights}


def test_a_val_folder_without_labels_is_refused_before_any_work():
    from conftest import CALIB_DIR
    from onnxq.errors import OnnxqError

    with pytest.raises(OnnxqError, match="no instances.json"):
        QuantConfig.make(val=CALIB_DIR / "images")


def test_several_val_folders_rank_layers_on_the_first_ones_images():
    from onnxq.pipeline import verification_images
    from onnxq.repair import SENSITIVITY_IMAGES

    val = [MODELS_DIR.parent / "data" / "coco_val2017_first128", MODELS_DIR.parent / "data" / "coco_val2017_more500"]
    held, paths, note = verification_images(None, QuantConfig.make(val=val))
    assert held == [] and note is None and len(paths) == SENSITIVITY_IMAGES
    assert all(str(val[0]) in str(p) for p in paths)
