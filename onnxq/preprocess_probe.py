"""--preset auto: run the float model on a few images under candidate preprocessings and keep the one under
which it detects confidently and consistently.

Candidates are the presets and their variants along two axes. Values: RGB or BGR, each with /255, raw 0-255
or ImageNet mean/std (NanoDet's mean/std on 0-255 is the same normalisation in other units): 6. Geometry:
centred letterbox, top-left letterbox, stretch: 3. The search starts from the detected family's preset and
moves one axis at a time (values, then geometry, again until neither moves), so about 8 of the 18 are run.
It moves only to a candidate that scores over PRIOR_MARGIN higher: closer than that, a few images cannot
tell two candidates apart (letterbox and stretch often score within it), and the family's preset stays.

Score: each image is also run mirrored, and as a mirrored central crop (CROP of each side, so enlarged).
For an image's TOP_K best detections (eval's decoders, deploy protocol), each counts min(its score, the
score of the same-class detection that overlaps it most in the other view) x that overlap (IoU); summed
per image and averaged over the images, once per view; the score is the geometric mean of the two. Right
preprocessing: confident detections that follow the picture. Wrong colours or geometry: less confident.
Wrong scale: the model detects little, or fires on texture, which a mirror or an enlargement moves or
resizes. A candidate with more than MAX_OBJECTS detections above 0.5 per image is saturated (it fires
everywhere) and ranks below every other.
"""

from dataclasses import dataclass, replace

import numpy as np

from .errors import UsageError
from .preprocess import PRESETS, RESIZE_MODES, AutoPreprocess, Preprocess, prepare, preprocess_from_metadata

PROBE_IMAGES = 8
TOP_K = 10
PROBE_CONF = 0.05  # detections below this add next to nothing to a top-k sum; dropping them keeps NMS short
MAX_OBJECTS = 50  # mean detections above 0.5 per image beyond which the model is saturated, not seeing objects
PRIOR_MARGIN = 0.05  # relative score gain another candidate needs to replace the family's preset
CROP = 0.7  # side of the central crop, as a fraction of the picture's

# (label, scale, mean, std) with mean and std in the picture's R, G, B order
SCALINGS = (
    ("/255", 255.0, None, None),
    ("0-255", 1.0, None, None),
    ("/255 ImageNet mean/std", 255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("0-255 NanoDet mean/std", 1.0, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
)


def _in_order(values, order):
    """R, G, B values in the input's channel order."""
    return None if values is None else tuple(values[::-1]) if order == "bgr" else tuple(values)


def _effect(pp: Preprocess):
    """What pp does to a pixel (x' = a*x + b per input channel) and where: equal effects are one candidate."""
    mean = pp.mean or (0.0, 0.0, 0.0)
    std = pp.std or (1.0, 1.0, 1.0)
    a = tuple(round(1 / (pp.scale * s), 9) for s in std)
    b = tuple(round(-m / s, 9) for m, s in zip(mean, std))
    return pp.order, a, b, pp.resize, None if pp.resize == "stretch" else pp.pad


def swapped(pp: Preprocess) -> Preprocess:
    """pp feeding the other channel order, each colour keeping its own mean and std."""
    flip = (lambda v: None if v is None else v[::-1])
    return replace(pp, order="rgb" if pp.order == "bgr" else "bgr", mean=flip(pp.mean), std=flip(pp.std))


def with_fixed(pp: Preprocess, fixed=None) -> Preprocess:
    """pp with the fields flags set (`fixed`, a dict); a fixed channel order keeps each colour's mean/std."""
    fixed = dict(fixed or {})
    if fixed.get("order", pp.order) != pp.order:
        pp = swapped(pp)
    return replace(pp, **fixed)


def value_candidates(start: Preprocess, fixed=None) -> list:
    """start, the presets' value settings (order, scale, mean, std) and their colour-swapped variants, each
    with start's geometry and `fixed` applied; duplicates in effect kept once, presets before variants."""
    presets = [replace(start, order=p.order, scale=p.scale, mean=p.mean, std=p.std) for p in PRESETS.values()]
    return _distinct([with_fixed(pp, fixed) for pp in [start] + presets + [swapped(p) for p in presets]])


def geometry_candidates(start: Preprocess, fixed=None) -> list:
    """start under each resize mode (start's own first), `fixed` applied; duplicates kept once."""
    modes = [start.resize] + [m for m in RESIZE_MODES if m != start.resize]
    return _distinct([with_fixed(replace(start, resize=m), fixed) for m in modes])


def _distinct(pps) -> list:
    seen, out = set(), []
    for pp in pps:
        if _effect(pp) not in seen:
            seen.add(_effect(pp))
            out.append(pp)
    return out


def describe(pp: Preprocess) -> str:
    """Short words, e.g. "RGB /255 ImageNet mean/std stretch = preset picodet"; describe() for the rest."""
    text = pp.describe()
    for label, scale, mean, std in SCALINGS:
        if (pp.scale, pp.mean, pp.std) == (scale, _in_order(mean, pp.order), _in_order(std, pp.order)):
            pad = "" if pp.resize == "stretch" or pp.pad == 114 else f" pad {pp.pad:g}"
            text = f"{pp.order.upper()} {label} {pp.resize}{pad}"
    named = [name for name, p in PRESETS.items() if p == pp]
    return text + (f" = preset {named[0]}" if named else "")


def spread(paths, n=PROBE_IMAGES) -> list:
    """n of `paths`, evenly spaced over their sorted order (all of them if there are n or fewer)."""
    paths = sorted(paths, key=str)
    if len(paths) <= n:
        return paths
    return [paths[i * len(paths) // n] for i in range(n)]


def load_pictures(paths) -> list:
    """[(path, HxWx3 uint8 RGB)] of the readable ones."""
    from .images import ImageError, load_image

    out = []
    for p in paths:
        try:
            out.append((p, load_image(p)))
        except ImageError:
            continue  # calibration reports unreadable files; the probe just uses the others
    return out


def session_runner(model, threads=None):
    """A detect_batch runner (feed -> outputs in model order) for an onnx.ModelProto on onnxruntime CPU."""
    from .backends.ort.runner import create_session, session_options

    session = create_session(model, session_options(threads), "the float model")
    names = [o.name for o in session.get_outputs()]
    return lambda feed: session.run(names, feed)


def detections(runner, family, inputs, picture, pp):
    """(boxes xyxy in picture pixels, scores, classes) of one picture under pp, deploy protocol."""
    from .evaluate.detect import detect_batch
    from .images import Batch

    x, transform = prepare(picture, inputs.hw, pp)
    batch = Batch(x[None], [transform], ["probe"])
    return detect_batch(runner, family, inputs, batch, conf=PROBE_CONF, protocols=("deploy",))["deploy"][0]


@dataclass(frozen=True)
class Views:
    """A picture, its mirror image and its mirrored central crop (CROP of each side), and where that crop lies."""

    picture: np.ndarray
    mirror: np.ndarray
    crop: np.ndarray
    left: int
    top: int

    @classmethod
    def of(cls, picture):
        h, w = picture.shape[:2]
        cw, ch = max(1, round(w * CROP)), max(1, round(h * CROP))
        left, top = (w - cw) // 2, (h - ch) // 2
        crop = np.ascontiguousarray(picture[top:top + ch, left:left + cw][:, ::-1])
        return cls(picture, np.ascontiguousarray(picture[:, ::-1]), crop, left, top)


def mirrored_back(dets, width, left=0, top=0):
    """Detections of a mirrored picture `width` wide, placed at (left, top) of the original, in the original's
    coordinates."""
    boxes, scores, classes = dets
    boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    boxes[:, [0, 2]] = width - boxes[:, [2, 0]] + left
    boxes[:, [1, 3]] += top
    return boxes, scores, classes


def agreement(dets, other) -> float:
    """Sum over dets' TOP_K best of min(score, its match's score) x IoU, its match being the same-class
    detection of `other` (another view's, in the same coordinates) that overlaps it most (none: 0)."""
    from .evaluate.nms import box_iou

    boxes, scores, classes = dets
    m_boxes, m_scores, m_classes = other
    total = 0.0
    for i in np.argsort(-np.asarray(scores), kind="stable")[:TOP_K]:
        same = np.flatnonzero(m_classes == classes[i])
        if same.size:
            ious = box_iou(boxes[i], m_boxes[same])
            j = int(ious.argmax())
            total += min(float(scores[i]), float(m_scores[same[j]])) * float(ious[j])
    return total


@dataclass(frozen=True)
class Scored:
    pp: Preprocess
    mirror: float  # mean agreement with the mirror image over the images
    crop: float  # mean agreement with the mirrored crop
    confident: float  # mean detections above 0.5 per image

    @property
    def score(self) -> float:
        return float(np.sqrt(self.mirror * self.crop))  # both views must agree: one alone can be fooled

    @property
    def saturated(self) -> bool:
        return self.confident > MAX_OBJECTS

    def text(self) -> str:
        extra = f", saturated: {self.confident:.0f} detections above 0.5 per image" if self.saturated else ""
        return f"{describe(self.pp)} {self.score:.2f}{extra}"


def score_candidate(runner, family, inputs, views, pp) -> Scored:
    found = [detections(runner, family, inputs, v.picture, pp) for v in views]
    n = len(views)
    confident = sum(int((np.asarray(scores) > 0.5).sum()) for _, scores, _ in found) / n
    if confident > MAX_OBJECTS:  # saturated: it ranks last whatever its views say
        return Scored(pp, 0.0, 0.0, confident)
    mirror = crop = 0.0
    for v, dets in zip(views, found):
        mirror += agreement(dets, mirrored_back(detections(runner, family, inputs, v.mirror, pp), v.mirror.shape[1]))
        crop += agreement(dets, mirrored_back(detections(runner, family, inputs, v.crop, pp), v.crop.shape[1],
                                              v.left, v.top))
    return Scored(pp, mirror / n, crop / n, confident)


def _rank(s: Scored):
    return (s.saturated, -s.score)


def clearly_better(a: Scored, b: Scored) -> bool:
    """a beats b by more than PRIOR_MARGIN, or b is saturated and a is not."""
    if a.saturated != b.saturated:
        return b.saturated
    return a.score > b.score * (1 + PRIOR_MARGIN)


@dataclass
class ProbeResult:
    chosen: Scored
    runner_up: Scored | None  # the best other candidate scored
    images: int

    @property
    def best(self) -> Preprocess:
        return self.chosen.pp

    def text(self) -> str:
        """e.g. "auto: RGB /255 stretch = preset darknet (score 1.84 on 8 images; next BGR /255 stretch 1.50)"."""
        head = f"auto: {describe(self.chosen.pp)} (score {self.chosen.score:.2f} on {self.images} images"
        if self.runner_up is None:
            return head + ")"
        close = "" if _rank(self.chosen) < _rank(self.runner_up) else f", not over {PRIOR_MARGIN:.0%} better"
        return head + f"; next {self.runner_up.text()}{close})"


def probe(model, inputs, family, paths, fixed=None, threads=None, n_images=PROBE_IMAGES) -> ProbeResult:
    """Search the candidates on `n_images` of `paths` with the float `model` (onnx.ModelProto) decoded as
    `family`, starting from the family's preset. fixed: {field: value} from flags, kept in every candidate.
    Deterministic: the same images, and on equal scores the earlier candidate."""
    views = [Views.of(p) for _, p in load_pictures(spread(paths, n_images))]
    if not views:
        raise UsageError(f"--preset auto: none of the {len(paths)} images given could be read")
    runner = session_runner(model, threads)
    scored = {}

    def score(pp):
        if _effect(pp) not in scored:
            scored[_effect(pp)] = score_candidate(runner, family, inputs, views, pp)
        return scored[_effect(pp)]

    def move(current, pps):  # the axis' best, where it is clearly better than the current choice
        top = min((score(pp) for pp in pps), key=_rank)  # min keeps the earlier of equals
        return top if clearly_better(top, current) else current

    current = score(with_fixed(PRESETS[family.preset], fixed))
    while True:  # axis by axis until neither moves; each move is a clear gain, so this ends
        moved = move(current, value_candidates(current.pp, fixed))
        moved = move(moved, geometry_candidates(moved.pp, fixed))
        if moved is current:
            break
        current = moved
    others = sorted((s for s in scored.values() if s is not current), key=_rank)
    return ProbeResult(current, others[0] if others else None, len(views))


def cannot_probe(family) -> str | None:
    """Why auto cannot score this layout (eval's decoders cannot read it), or None."""
    if family is None:
        return "eval cannot tell the output layout"
    if family.missing:
        return f"eval cannot decode the outputs ({family.missing})"
    if family.preset not in PRESETS:
        return f"no preset for {family.name} outputs"
    return None


NEEDS_IMAGES = "--preset auto needs images to try the candidates on: give --calib DIR"


def choose(model, inputs, family, paths, fixed=None, threads=None, n_images=PROBE_IMAGES):
    """(Preprocess, source text) that probe picks, or (None, one line on why auto cannot pick) where eval
    cannot decode the layout or no candidate detects anything."""
    why = cannot_probe(family)
    if why is not None:
        return None, f"auto cannot score this model: {why}"
    if not paths:
        raise UsageError(NEEDS_IMAGES)
    result = probe(model, inputs, family, paths, fixed, threads, n_images)
    if result.chosen.score <= 0:
        return None, f"auto: no candidate gives consistent detections on the {result.images} images"
    return result.best, result.text()


def guess_source(family, meta=None) -> str:
    """Where the default rule's preset comes from, in words; where it is a guess, says so and what to do."""
    from .evaluate.families import preset_source

    if family is None:
        return ("preset ultralytics (default, a guess: onnxq does not know this output layout; set it with "
                "--preset NAME or flags)")
    text = preset_source(family, meta)
    if not family.preset_guess or not text.endswith(")") or "a guess" not in text:
        return text
    advice = "set it with --preset NAME or flags" if cannot_probe(family) else "try --preset auto, or set it with flags"
    return f"{text[:-1]}; {advice})"


def resolve(model, inputs, family_of, explicit=None, explicit_source="flags", images=()):
    """resolve_rule's preprocessing, its values kept at 0-255 where the model takes uint8 pixels (it scales
    them itself: any scale, mean or std would be applied twice)."""
    pp, source = resolve_rule(model, inputs, family_of, explicit, explicit_source, images)
    if getattr(inputs, "uint8_pixels", False) and (pp.scale != 1 or pp.mean is not None or pp.std is not None):
        pp = replace(pp, scale=1.0, mean=None, std=None)
        source += "; pixels 0-255 as they are: the model takes uint8 and scales them itself"
    return pp, source


def resolve_rule(model, inputs, family_of, explicit=None, explicit_source="flags", images=()):
    """(Preprocess, where it came from), the one rule quantize, calibrate, inspect, eval and compare share:
    explicit > onnxq metadata > the detected family's preset > Ultralytics metadata > a guessed family's
    preset > ultralytics. The
    source text says "a guess" where the outputs do not tell it.

    family_of(): the model's Family or None, asked only where needed. explicit: a Preprocess, or an
    AutoPreprocess (--preset auto), which tries the candidates (choose) on `images` (paths; default the
    ones it carries) and falls back to the rule, saying why, where eval cannot decode the outputs."""
    from .evaluate.families import is_ultralytics

    fallback = ""
    if isinstance(explicit, AutoPreprocess):
        paths = list(images) if images else list(explicit.images)
        explicit, explicit_source = choose(model, inputs, family_of(), paths, dict(explicit.fixed))
        fallback = f"{explicit_source}; " if explicit is None else ""
    if explicit is not None:
        return explicit, explicit_source
    meta = {p.key: p.value for p in model.metadata_props}
    stored = preprocess_from_metadata(meta)
    if stored is not None:
        return stored, fallback + "model metadata"
    family = family_of()
    known = family is not None and family.preset in PRESETS
    if known and not family.preset_guess:  # outputs that name their family say more than an exporter's name
        return PRESETS[family.preset], fallback + guess_source(family, meta)
    if is_ultralytics(meta):
        return PRESETS["ultralytics"], fallback + "preset ultralytics (Ultralytics metadata)"
    if known:
        return PRESETS[family.preset], fallback + guess_source(family, meta)
    return PRESETS["ultralytics"], fallback + guess_source(None, meta)


def with_probe_images(pp, folder, num_images=None, seed=0):
    """An AutoPreprocess given the images under `folder` to probe on (what a command's --calib lists); any
    other value, or none without a folder, as it is."""
    if not isinstance(pp, AutoPreprocess) or pp.images or not folder:
        return pp
    from .images import list_images

    return replace(pp, images=tuple(list_images(folder, num_images=num_images, seed=seed)))
