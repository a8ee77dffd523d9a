"""Procedural 2.5D talking-face renderer (skia, anti-aliased) with exact per-frame ground truth.

Geometry lives in *head units* (face half-width ~1). The head is a stack of rings (the frontal
outline, scaled like an ellipsoid in depth); face features are 2D shapes in face-plane
coordinates ``(u, v)`` (u right, v down) lifted onto the ellipsoidal front surface, so that a
yaw/pitch rotation shifts and foreshortens them, compresses the far side and moves the nose tip
(which sticks out of the surface) the most. Roll rotates everything in the image plane. The
outline, ears, hair and accessories are 3D point sets too and follow the same rotation, with a
mild perspective so the near side is slightly larger.

Conventions (screen = image pixels, y down):
  * yaw > 0 turns the face towards image right (the nose moves right);
  * pitch > 0 tilts the face down (the nose moves down);
  * roll > 0 rotates the head clockwise on screen;
  * gaze_x > 0 looks towards image right, gaze_y > 0 looks down;
  * blink = 1 is fully closed.

Drawing is back to front: background, shoulders, back hair, ears, neck, head, hair cap, face skin,
then features. Everything is drawn directly at the output size with anti-aliased paths.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import skia

from eartalk.data.identity import HAIR_STYLES, Identity
from eartalk.data.mouth import MouthShape
from eartalk.model.config import CONTROLS, EMOTIONS

_DEPTH = 0.95          # head depth half-axis relative to the face half-width
_FOCAL = 9.0           # perspective distance (head units): mild, so the near side grows
_SCALE = 0.32          # head unit -> fraction of the image size
_CENTER_Y = 0.50       # head centre, fraction of the image height
_PIVOT = np.array([0.0, 0.45, -0.25])   # rotate about the upper neck, not the head centre

_BALD, _BUZZ, _SHORT, _SIDE, _LONG, _BUN, _CURLY = range(len(HAIR_STYLES))


# ---------------------------------------------------------------------------------------- state
@dataclass
class FaceState:
    """Everything that changes per frame. Ranges for pose come from ``config.CONTROLS``."""

    mouth: MouthShape = field(default_factory=MouthShape)
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    gaze_x: float = 0.0
    gaze_y: float = 0.0
    blink: float = 0.0
    emotion: int = 0               # index into config.EMOTIONS
    emotion_intensity: float = 1.0

    def __post_init__(self):
        if not isinstance(self.mouth, MouthShape):
            raise ValueError(f"FaceState.mouth must be a MouthShape, got {type(self.mouth).__name__}")
        for name in ("yaw", "pitch", "roll", "gaze_x", "gaze_y", "blink"):
            lo, hi = CONTROLS[name][2]
            v = getattr(self, name)
            if not isinstance(v, (int, float, np.floating, np.integer)) or not (lo <= v <= hi):
                raise ValueError(f"FaceState.{name}={v!r}: expected a number in [{lo}, {hi}]")
        e = self.emotion
        if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or not 0 <= e < len(EMOTIONS):
            raise ValueError(f"FaceState.emotion={e!r}: expected an int index in "
                             f"[0, {len(EMOTIONS) - 1}] into {EMOTIONS}")
        if not (0.0 <= self.emotion_intensity <= 1.0):
            raise ValueError(f"FaceState.emotion_intensity={self.emotion_intensity!r}: "
                             "expected a number in [0, 1]")


# ---------------------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=4096)
def _color(c, alpha: float = 1.0, k: float = 1.0) -> int:
    """RGB floats (scaled by k, clipped) -> skia ARGB int."""
    r, g, b = (min(255, max(0, int(round(x * k * 255)))) for x in c)
    return skia.ColorSetARGB(int(round(alpha * 255)), r, g, b)


def _mix(a, b, t: float):
    return tuple((1 - t) * x + t * y for x, y in zip(a, b))


def _path(pts: np.ndarray, close: bool = True) -> skia.Path:
    """Polygon/polyline path from an [n, 2] array (lineTo loop: faster than addPoly here)."""
    p = skia.Path()
    lst = pts.tolist()
    p.moveTo(*lst[0])
    for x, y in lst[1:]:
        p.lineTo(x, y)
    if close:
        p.close()
    return p


def _fill(canvas, pts, color: int):
    canvas.drawPath(_path(pts), skia.Paint(AntiAlias=True, Color=color))


def _stroke(canvas, pts, color: int, width: float, close: bool = False):
    paint = skia.Paint(AntiAlias=True, Color=color, Style=skia.Paint.kStroke_Style,
                       StrokeWidth=width, StrokeCap=skia.Paint.kRound_Cap,
                       StrokeJoin=skia.Paint.kRound_Join)
    canvas.drawPath(_path(pts, close), paint)


class _Head:
    """The posed head of one identity: projects 3D points and face-plane shapes to pixels."""

    def __init__(self, ident: Identity, st: FaceState, size: int):
        self.id, self.st, self.size = ident, st, size
        self.a = ident.face_width
        self.b = ident.face_width * ident.face_height
        self.c = _DEPTH * ident.face_width
        self._ia, self._ib = 1 / (self.a * 1.02), 1 / (self.b * 1.05)   # surface half-axes
        y, p, r = (math.radians(x) for x in (st.yaw, st.pitch, st.roll))
        ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
        rx = np.array([[1, 0, 0], [0, math.cos(p), math.sin(p)], [0, -math.sin(p), math.cos(p)]])
        rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
        self.R = rz @ rx @ ry
        # Rotation about the pivot as one affine map: q = p @ R^T + t.
        self.RT = self.R.T.copy()
        self.t = _PIVOT - _PIVOT @ self.RT
        self.px = size * _SCALE
        self.center = np.array([0.5 * size, _CENTER_Y * size])
        self.jaw_drop = 0.16 * st.mouth.open * (1 - st.mouth.press)

    # -- projection
    def project(self, p3: np.ndarray) -> np.ndarray:
        """[n, 3] head-space points -> [n, 2] pixels (rotation about the pivot + perspective)."""
        q = p3 @ self.RT + self.t
        k = self.px * _FOCAL / (_FOCAL - q[:, 2:3])
        return q[:, :2] * k + self.center

    def surface_z(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Depth of the front surface at face-plane (u, v): an ellipsoid, clamped at the rim."""
        r = 1.0 - (u * self._ia) ** 2 - (v * self._ib) ** 2
        return self.c * np.sqrt(np.maximum(r, 0.0))

    def uv(self, u, v, dz=0.0) -> np.ndarray:
        """Face-plane points lifted onto the surface (plus dz outwards), projected to pixels."""
        u = np.asarray(u, float)
        p = np.empty((u.shape[0], 3))
        p[:, 0] = u
        p[:, 1] = v
        p[:, 2] = self.surface_z(u, p[:, 1])
        p[:, 2] += dz
        return self.project(p)

    # -- head outline (frontal), with the jaw lowered by the mouth opening
    def outline(self, n: int = 48) -> np.ndarray:
        th = np.linspace(0, 2 * np.pi, n, endpoint=False)
        c, s = np.cos(th), np.sin(th)           # s > 0: lower half (v down)
        lower = s > 0
        # Superellipse exponent: 2 = round; larger = squarer. The jaw squareness only shapes the
        # lower half; the cranium stays round.
        e = np.where(lower, 2.0 + 1.8 * self.id.jaw, 2.1)
        x = self.a * np.sign(c) * np.abs(c) ** (2 / e)
        y = self.b * np.sign(s) * np.abs(s) ** (2 / e)
        # Pointed chin: taper the width towards the bottom.
        taper = 1 - 0.35 * self.id.chin * np.clip(y / self.b, 0, 1) ** 2
        x = x * np.where(lower, taper, 1.0)
        # The open jaw pulls the lower face down (more towards the chin).
        y = y + self.jaw_drop * np.clip((y - 0.3 * self.b) / (0.7 * self.b), 0, 1)
        return np.stack([x, y], axis=1)

    def rings(self, outline: np.ndarray, scale: float = 1.0, depths=(-0.85, -0.45, 0.0, 0.45, 0.85),
              y_max: float | None = None):
        """3D point cloud of the head volume: the outline shrunk like an ellipsoid along depth.
        ``y_max`` keeps only points above that height (caps: hair, hats), after shrinking."""
        pts = []
        for t in depths:
            k = math.sqrt(1 - t * t) * scale
            pts.append(np.column_stack([outline * k, np.full(len(outline), t * self.c * scale)]))
        pts = np.concatenate(pts)
        return pts if y_max is None else pts[pts[:, 1] < y_max]


@functools.lru_cache(maxsize=8)
def _dirs(n: int) -> np.ndarray:
    th = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(th), np.sin(th)])


def _hull(pts2: np.ndarray, n_dirs: int = 64) -> np.ndarray:
    """Convex silhouette of a projected point cloud via the support function (ordered, cheap)."""
    idx = np.argmax(pts2 @ _dirs(n_dirs), axis=0)
    return pts2[idx]


# ---------------------------------------------------------------------------------------- emotion
def _emotion_weights(st: FaceState) -> dict[str, float]:
    w = {name: 0.0 for name in EMOTIONS}
    w[EMOTIONS[st.emotion]] = float(st.emotion_intensity)
    return w


# ---------------------------------------------------------------------------------------- render
def render(identity: Identity, state: FaceState, size: int = 128) -> np.ndarray:
    """Render one frame: uint8 RGB array [size, size, 3]. Deterministic in (identity, state)."""
    if not isinstance(identity, Identity):
        raise ValueError(f"identity must be an Identity, got {type(identity).__name__}")
    if not isinstance(state, FaceState):
        raise ValueError(f"state must be a FaceState, got {type(state).__name__}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16 or size % 16:
        raise ValueError(f"size={size!r}: expected a positive multiple of 16")
    size = int(size)
    info = skia.ImageInfo.Make(size, size, skia.kRGBA_8888_ColorType, skia.kPremul_AlphaType)
    out = np.empty((size, size, 4), np.uint8)
    surface = skia.Surface.MakeRasterDirect(info, out)   # draws straight into ``out``
    _draw(surface.getCanvas(), _Head(identity, state, size))
    del surface
    return np.ascontiguousarray(out[:, :, :3])


def render_portrait(identity: Identity, size: int = 128) -> np.ndarray:
    """The sink frame: frontal, neutral, mouth closed, eyes open."""
    return render(identity, FaceState(), size)


def _draw(cv: skia.Canvas, h: _Head):
    ident, st, s = h.id, h.st, h.size
    emo = _emotion_weights(st)
    skin = ident.skin
    if emo["angry"]:
        skin = _mix(skin, (0.85, 0.3, 0.25), 0.12 * emo["angry"])   # flushed

    cv.drawImage(_backdrop(ident, s), 0, 0)
    cx, px = s / 2, h.px
    body_top = h.center[1] + 1.3 * px * ident.face_height
    outline = h.outline()
    style = ident.hair_style
    hair_c = _color(ident.hair_color)

    if style == _LONG:   # hair behind head and neck, down to the shoulders
        back = np.concatenate([
            h.rings(outline, 1.12, depths=(-0.8, -0.4, 0.0, 0.3), y_max=0.2 * h.b),
            np.array([[sx * 1.15 * h.a, h.b * yy, zz] for sx in (-1, 1) for yy in (0.3, 1.0, 1.45)
                      for zz in (-0.7, -0.1)])])
        _fill(cv, _hull(h.project(back)), hair_c)
    neck_w = 0.48 * h.a
    neck = np.array([[cx - neck_w * px, h.center[1] + 0.5 * px], [cx + neck_w * px, h.center[1] + 0.5 * px],
                     [cx + neck_w * 1.1 * px, body_top + 0.2 * px], [cx, body_top + 0.45 * px],
                     [cx - neck_w * 1.1 * px, body_top + 0.2 * px]])
    _fill(cv, neck, _color(skin, k=0.78))
    if style == _BUN:
        bun = np.array([[0.0, -1.02 * h.b, -0.55 * h.c]]) + 0.42 * _sphere()
        _fill(cv, _hull(h.project(bun), 36), hair_c)

    # Ears: tilted planes at the sides, drawn behind the head so the head occludes them.
    if style not in (_LONG, _CURLY):
        for side in (-1, 1):
            t = np.linspace(0, 2 * np.pi, 20, endpoint=False)
            e1 = np.array([0.0, 1.0, 0.0]) * 0.24 * ident.ear_size
            e2 = np.array([side * 0.6, 0.0, -0.8]) * 0.16 * ident.ear_size
            base = np.array([side * 0.96 * h.a, 0.06 * h.b, -0.12 * h.c])
            ear = base + np.outer(np.cos(t), e1) + np.outer(np.sin(t), e2) + np.array([side * 0.09, 0, 0])
            _fill(cv, h.project(ear), _color(skin, k=0.9))
            inner = base + 0.55 * (np.outer(np.cos(t), e1) + np.outer(np.sin(t), e2)) + np.array([side * 0.09, 0, 0])
            _fill(cv, h.project(inner), _color(skin, k=0.72))
            if ident.earrings:
                lobe = h.project((base + e1 * 1.05 + np.array([side * 0.09, 0, 0]))[None])[0]
                cv.drawCircle(float(lobe[0]), float(lobe[1]) + 0.07 * px, 0.07 * px,
                              skia.Paint(AntiAlias=True, Color=_color(ident.earring_color)))

    # Head volume silhouette; shaded by a radial gradient centred on the projected face front,
    # which moves with yaw/pitch (a strong, smooth pose cue).
    head_sil = _hull(h.project(h.rings(outline)))
    front = h.project(np.array([[0.0, -0.1 * h.b, h.c * 1.1]]))[0]
    shade = skia.Paint(AntiAlias=True, Shader=skia.GradientShader.MakeRadial(
        skia.Point(*front), float(1.55 * h.a * px), [_color(skin, k=1.06), _color(skin, k=1.0),
                                                      _color(skin, k=0.80)], [0.0, 0.45, 1.0]))
    cv.drawPath(_path(head_sil), shade)

    # Hair cap over the top of the head; the face skin is drawn over it below the hairline.
    cap_scale = {_BUZZ: 1.025, _SHORT: 1.07, _SIDE: 1.08, _LONG: 1.1, _BUN: 1.06, _CURLY: 1.28}
    if style != _BALD:
        cut = {_CURLY: 0.35 * h.b, _LONG: 0.1 * h.b}.get(style, -0.12 * h.b)
        cap = h.rings(outline, cap_scale[style], y_max=cut)
        cap_col = _mix(ident.hair_color, skin, 0.45) if style == _BUZZ else ident.hair_color
        cap_sil = _hull(h.project(cap))
        _fill(cv, cap_sil, _color(cap_col))
        if style == _CURLY:   # bumpy rim for a curly texture
            for p in cap_sil[::3]:
                cv.drawCircle(float(p[0]), float(p[1]), 0.16 * px,
                              skia.Paint(AntiAlias=True, Color=_color(cap_col, k=0.85)))
    if ident.headwear == 2:
        # Beanie crown: drawn before the face skin so that the face occludes the part of the
        # crown behind the head (visible when the face tilts up); the cuff comes later.
        crown = np.concatenate([h.rings(outline, 1.16, y_max=-0.55 * h.b),
                                np.array([[0, -1.3 * h.b, -0.1 * h.c]])])
        _fill(cv, _hull(h.project(crown)), _color(ident.headwear_color))
    if style != _BALD or ident.headwear == 2:
        # Face skin below the hairline (lifted onto the front surface).
        _fill_face_region(cv, h, outline, style, shade)
    if style != _BALD:
        if style == _SIDE:
            part = np.stack([np.full(6, -0.35 * h.a), np.linspace(-0.98 * h.b, -0.7 * h.b, 6)], 1)
            _stroke(cv, h.uv(part[:, 0], part[:, 1], 0.05), _color(ident.hair_color, k=0.6), 0.03 * px)

    _draw_features(cv, h, emo, skin)
    _draw_accessories(cv, h, outline)


@functools.lru_cache(maxsize=64)
def _backdrop(ident: Identity, s: int) -> skia.Image:
    """Background gradient and shoulders: they never move, so render once per identity+size."""
    surface = skia.Surface(s, s)
    cv = surface.getCanvas()
    ang = math.radians(ident.bg_angle)
    d = np.array([math.cos(ang), math.sin(ang)]) * s * 0.5
    c0 = np.array([s / 2, s / 2])
    cv.drawPaint(skia.Paint(Shader=skia.GradientShader.MakeLinear(
        [skia.Point(*(c0 - d)), skia.Point(*(c0 + d))], [_color(ident.bg_color1), _color(ident.bg_color2)])))
    # Shoulders: the body stays put and only the head turns, which makes pose readable.
    cx, px = s / 2, s * _SCALE
    body_top = _CENTER_Y * s + 1.3 * px * ident.face_height
    sh = np.array([[cx - 2.9 * px, s + 2], [cx - 2.6 * px, body_top + 0.55 * px],
                   [cx - 1.6 * px, body_top], [cx + 1.6 * px, body_top],
                   [cx + 2.6 * px, body_top + 0.55 * px], [cx + 2.9 * px, s + 2]])
    _fill(cv, sh, _color(ident.shirt_color))
    return surface.makeImageSnapshot()


def _sphere(n: int = 10) -> np.ndarray:
    th, ph = np.meshgrid(np.linspace(0, 2 * np.pi, n, endpoint=False), np.linspace(-1.4, 1.4, 5))
    return np.stack([np.cos(th) * np.cos(ph), np.sin(ph), np.sin(th) * np.cos(ph)], -1).reshape(-1, 3)


def _fill_face_region(cv, h: _Head, outline: np.ndarray, style: int, paint: skia.Paint):
    """Skin of the face below the hairline, on the front surface (hides the cap's front)."""
    b = h.b
    side_y = {_CURLY: -0.3 * b, _LONG: -0.25 * b}.get(style, -0.2 * b)
    low = outline[outline[:, 1] >= side_y]
    # Order right temple -> chin -> left temple (angle measured from the top of the head).
    low = low[np.argsort(np.mod(np.arctan2(low[:, 1], low[:, 0]) + np.pi / 2, 2 * np.pi))]
    us = 0.5 * (abs(low[0, 0]) + abs(low[-1, 0]))               # half-width at the temples
    u = np.linspace(-us, us, 17)
    top = {_SIDE: -0.62 * b, _BUZZ: -0.72 * b, _CURLY: -0.55 * b, _LONG: -0.6 * b}.get(style, -0.6 * b)
    # Hairline: rounded arch from the temples to the top; side part sweeps it asymmetrically.
    arch = side_y + (top - side_y) * (1 - np.abs(u / us) ** 3)
    if style == _SIDE:
        arch = arch + 0.08 * b * (u / us)
    if style == _SHORT:
        arch = arch + 0.05 * b * np.cos(u * 9) ** 2   # fringe bumps
    # Closed loop: down the jaw, then back across the hairline from the left temple.
    pts = np.concatenate([low, np.stack([u, arch], 1)])
    cv.drawPath(_path(h.uv(pts[:, 0], pts[:, 1])), paint)


# ---------------------------------------------------------------------------------------- features
def _draw_features(cv, h: _Head, emo: dict, skin):
    ident, st = h.id, h.st
    px = h.px
    happy, sad, angry, surp = emo["happy"], emo["sad"], emo["angry"], emo["surprised"]

    # Cheeks: happy raises and flushes them.
    if happy:
        for side in (-1, 1):
            t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
            cu, cvv = side * (ident.eye_spacing + 0.08), ident.eye_height + 0.36
            _fill(cv, h.uv(cu + 0.17 * np.cos(t), cvv + 0.1 * np.sin(t), 0.01),
                  _color((0.95, 0.35, 0.4), alpha=0.45 * happy))

    _draw_eyes(cv, h, emo)
    _draw_brows(cv, h, emo)
    _draw_nose(cv, h, skin)
    _draw_mouth(cv, h, emo, skin)

    if angry:   # frown lines between the brows
        for side in (-1, 1):
            x = side * 0.06
            y0 = ident.eye_height - 0.22
            _stroke(cv, h.uv(np.array([x, x * 1.3]), np.array([y0, y0 + 0.12])),
                    _color(skin, alpha=angry, k=0.55), 0.035 * px)
    if surp:    # forehead lines
        for k in range(2):
            y0 = ident.eye_height - 0.5 - 0.09 * k
            uu = np.linspace(-0.3, 0.3, 9)
            _stroke(cv, h.uv(uu, y0 - 0.03 * np.cos(uu * 4)), _color(skin, alpha=surp, k=0.65), 0.03 * px)
    if happy:   # smile folds from the nose wings round the mouth corners
        for side in (-1, 1):
            tt = np.linspace(0, 1, 8)
            uu = side * (0.16 + 0.18 * ident.nose_width * 0.5 + 0.14 * np.sin(tt * 1.6))
            vv = ident.eye_height + 0.4 + 0.38 * tt
            _stroke(cv, h.uv(uu, vv), _color(skin, alpha=0.8 * happy, k=0.68), 0.035 * px)


def _eye_dims(ident: Identity) -> tuple[float, float]:
    """Half-width and open half-height of an eye, head units (large: legible at 128 px)."""
    return 0.21 * ident.eye_size, 0.13 * ident.eye_size


def _draw_eyes(cv, h: _Head, emo: dict):
    ident, st, px = h.id, h.st, h.px
    ew, eh = _eye_dims(ident)
    # Emotion sets how wide the open eye is; blink closes it from there.
    open_k = 1.0 + 0.45 * emo["surprised"] - 0.25 * emo["angry"] - 0.18 * emo["sad"] - 0.2 * emo["happy"]
    lower_k = 1.0 - 0.35 * emo["happy"]        # happy raises the lower lid
    x = np.linspace(-1, 1, 15)
    prof = np.sqrt(np.clip(1 - x * x, 0, None)) ** 0.85
    lid_col = _color(ident.skin, k=0.82)
    lash = skia.ColorSetARGB(255, 35, 22, 20)
    for side in (-1, 1):
        cu, cvv = side * ident.eye_spacing, ident.eye_height
        uu = cu + x * ew
        tilt = 0.02 * side * x                       # outer corner slightly higher: almond
        bot = cvv + eh * 0.55 * lower_k * prof - tilt
        top_open = cvv - eh * open_k * prof - tilt
        top = top_open + st.blink * (bot - top_open)
        # Eye socket shadow: the region a fully open lid would show (reads as eyelid skin).
        sock = np.concatenate([h.uv(uu, cvv - eh * 1.5 * prof - tilt - 0.02), h.uv(uu[::-1], bot[::-1])])
        _fill(cv, sock, lid_col)
        if st.blink < 0.98:
            eye = np.concatenate([h.uv(uu, top), h.uv(uu[::-1], bot[::-1])])
            eye_path = _path(eye)
            cv.drawPath(eye_path, skia.Paint(AntiAlias=True, Color=skia.ColorSetARGB(255, 245, 243, 238)))
            cv.save()
            cv.clipPath(eye_path, doAntiAlias=True)
            gu = cu + st.gaze_x * ew * 0.5
            gv = cvv + st.gaze_y * eh * 0.45 - 0.1 * eh
            t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
            ir = 0.78 * eh
            _fill(cv, h.uv(gu + ir * np.cos(t), gv + ir * np.sin(t), 0.005), _color(ident.eye_color))
            _fill(cv, h.uv(gu + 0.45 * ir * np.cos(t), gv + 0.45 * ir * np.sin(t), 0.006),
                  skia.ColorSetARGB(255, 15, 10, 10))
            hl = h.uv(np.array([gu + 0.3 * ir]), np.array([gv - 0.3 * ir]), 0.01)[0]
            cv.drawCircle(float(hl[0]), float(hl[1]), 0.18 * ir * px,
                          skia.Paint(AntiAlias=True, Color=skia.ColorSetARGB(230, 255, 255, 255)))
            cv.restore()
        # Upper lid line (lashes) along the current lid edge: at blink=1 this is the closed-eye arc.
        _stroke(cv, h.uv(uu, top), lash, (0.045 + 0.02 * st.blink) * px)
        _stroke(cv, h.uv(uu[2:-2], bot[2:-2]), _color(ident.skin, k=0.6), 0.018 * px)


def _draw_brows(cv, h: _Head, emo: dict):
    ident = h.id
    ew, eh = _eye_dims(ident)
    raise_ = 0.12 * emo["surprised"] + 0.03 * emo["happy"] - 0.05 * emo["angry"]
    inner_up = 0.13 * emo["sad"] - 0.13 * emo["angry"]          # + = inner end higher
    arch = 0.03 + 0.04 * ident.brow_arch + 0.04 * emo["surprised"]
    thick = 0.05 * ident.brow_thickness
    t = np.linspace(0, 1, 10)                                  # 0 = inner end, 1 = outer end
    for side in (-1, 1):
        uu = side * (ident.eye_spacing - ew * 0.95 + t * ew * 2.15)
        base = ident.eye_height - eh - 0.1 - raise_
        vv = base - inner_up * (1 - t) - arch * np.sin(np.pi * np.clip(t * 1.15, 0, 1)) + 0.03 * t
        w = thick * (1.1 - 0.5 * t)                            # thicker at the inner end
        poly = np.concatenate([h.uv(uu, vv - w / 2, 0.01), h.uv(uu[::-1], (vv + w / 2)[::-1], 0.01)])
        _fill(cv, poly, _color(ident.brow_color))


def _draw_nose(cv, h: _Head, skin):
    ident, px = h.id, h.px
    nl, nw = ident.nose_length, ident.nose_width
    top_v = ident.eye_height + 0.05
    tip_v = ident.eye_height + 0.34 + 0.06 * nl
    zs = lambda u, v: h.surface_z(np.array([u]), np.array([v]))[0]  # noqa: E731
    tip = np.array([0.0, tip_v, zs(0, tip_v) + 0.2 * nl])
    # Wedge: bridge -> wings -> tip, shaded; the tip sticks out so it moves most under yaw.
    pts3 = np.array([
        [0.0, top_v, zs(0, top_v) + 0.02],
        [-0.04, top_v + 0.1, zs(0, top_v) + 0.05],
        [-0.11 * nw, tip_v + 0.02, zs(0.1, tip_v) + 0.04],
        [-0.05 * nw, tip_v + 0.07, zs(0, tip_v) + 0.1 * nl],
        [0.05 * nw, tip_v + 0.07, zs(0, tip_v) + 0.1 * nl],
        [0.11 * nw, tip_v + 0.02, zs(0.1, tip_v) + 0.04],
        [0.04, top_v + 0.1, zs(0, top_v) + 0.05],
    ])
    _fill(cv, h.project(pts3), _color(skin, k=0.9))
    # Shadow on the side facing away from the viewer: turns with yaw.
    sgn = -1.0 if h.st.yaw >= 0 else 1.0
    side = np.array([
        [sgn * 0.02, top_v + 0.06, zs(0, top_v) + 0.05],
        tip + np.array([sgn * 0.02, 0.0, 0.0]),
        [sgn * 0.12 * nw, tip_v + 0.02, zs(0.1, tip_v) + 0.04],
        [sgn * 0.06, top_v + 0.12, zs(0, top_v) + 0.03],
    ])
    _fill(cv, h.project(side), _color(skin, alpha=min(1.0, 0.2 + abs(h.st.yaw) / 25), k=0.72))
    # Nostrils and tip highlight.
    for sx in (-1, 1):
        n = h.project(np.array([[sx * 0.06 * nw, tip_v + 0.06, zs(0, tip_v) + 0.08 * nl]]))[0]
        cv.drawOval(skia.Rect.MakeXYWH(float(n[0] - 0.045 * px), float(n[1] - 0.025 * px),
                                       float(0.09 * px), float(0.05 * px)),
                    skia.Paint(AntiAlias=True, Color=_color(skin, k=0.45)))
    tp = h.project(tip[None])[0]
    cv.drawCircle(float(tp[0]), float(tp[1] - 0.02 * px), 0.05 * px,
                  skia.Paint(AntiAlias=True, Color=_color(skin, alpha=0.6, k=1.15)))


def _draw_mouth(cv, h: _Head, emo: dict, skin):
    ident, m, px = h.id, h.st.mouth, h.px
    vm = ident.eye_height + 0.78 + 0.5 * h.jaw_drop
    smile = emo["happy"] - 0.85 * emo["sad"] - 0.35 * emo["angry"]
    W = 0.33 * ident.mouth_width * (0.78 + 0.5 * m.width) * (1 - 0.42 * m.round)
    W *= 1 + 0.1 * emo["happy"] - 0.08 * emo["surprised"]
    # Opening: pressed lips cannot open; visible teeth/tongue need at least a small gap.
    H = 0.36 * m.open * (1 - m.press)
    H = max(H, 0.055 * m.teeth * (1 - m.press), 0.07 * m.tongue * (1 - m.press))
    H *= 1 + 0.25 * m.round * (1 - m.open)        # rounding makes a small round hole
    fl = ident.lip_fullness * (1 - 0.65 * m.press) * (1 + 0.35 * m.round)
    tu, tl = 0.055 * fl, 0.075 * fl * (1 - 0.45 * m.tuck)

    x = np.linspace(-1, 1, 21)
    xw = x * W
    corner = -0.15 * smile * x ** 2                   # corners up when smiling (v up = negative)
    p_in = 0.5 + 0.5 * (1 - m.round)                  # round -> elliptic opening profile
    g = np.clip(1 - x * x, 0, None) ** (p_in * 0.8)
    up_in = corner - H * 0.38 * g
    lo_in = corner + H * 0.62 * g - 0.04 * m.tuck * g  # tuck: lower lip drawn up under the teeth
    bow = 1 - 0.3 * np.exp(-(x / 0.18) ** 2)          # cupid's bow dip at the centre
    env = np.clip(1 - x * x, 0, None) ** 0.45
    up_out = up_in - tu * env * bow
    lo_out = lo_in + tl * env
    dz = 0.05 * m.round * np.clip(1 - x * x, 0, None)  # protrusion

    U = lambda v, rev=False: h.uv(xw[::-1] if rev else xw, (vm + v)[::-1] if rev else vm + v,  # noqa: E731
                                  dz[::-1] if rev else dz)
    # Lower lip, then upper lip (darker), then the opening on top.
    _fill(cv, np.concatenate([U(up_in * 0.5 + lo_in * 0.5), U(lo_out, True)]),
          _color(ident.lip_color, k=0.9 if m.tuck > 0.3 else 1.0))
    _fill(cv, np.concatenate([U(up_out), U(up_in * 0.5 + lo_in * 0.5 + 0.002, True)]),
          _color(ident.lip_color, k=0.85))
    gap = np.concatenate([U(up_in), U(lo_in, True)])
    if H > 0.004:
        gap_path = _path(gap)
        cv.drawPath(gap_path, skia.Paint(AntiAlias=True, Color=skia.ColorSetARGB(255, 45, 6, 12)))
        cv.save()
        cv.clipPath(gap_path, doAntiAlias=True)
        white = skia.ColorSetARGB(255, 248, 246, 236)
        top_v = vm + up_in.min()
        bot_v = vm + lo_in.max()
        if m.tongue > 0:
            # Tongue: rises from the floor of the mouth; high values bring the tip forward.
            t = np.linspace(0, 2 * np.pi, 18, endpoint=False)
            ty = bot_v - (0.25 + 0.5 * m.tongue) * (bot_v - top_v) * 0.8
            _fill(cv, h.uv(0.6 * W * np.cos(t), ty + 0.1 * np.sin(t) + 0.06, 0.03),
                  skia.ColorSetARGB(255, 214, 96, 108))
        if m.teeth > 0:
            th_up = m.teeth * max(0.045, 0.42 * (bot_v - top_v))
            _fill(cv, np.concatenate([U(up_in - 0.02), U(up_in + th_up * g ** 0.3, True)]), white)
            th_lo = m.teeth * 0.3 * (bot_v - top_v)
            if th_lo > 0.01:
                _fill(cv, np.concatenate([U(lo_in - th_lo * g ** 0.3), U(lo_in + 0.02, True)]),
                      skia.ColorSetARGB(255, 230, 226, 214))
        if m.tongue > 0.6:   # tongue tip between the teeth (TH)
            t = np.linspace(0, 2 * np.pi, 14, endpoint=False)
            _fill(cv, h.uv(0.38 * W * np.cos(t), vm + 0.2 * H * np.sin(t) + 0.1 * H, 0.04),
                  skia.ColorSetARGB(255, 224, 110, 120))
        cv.restore()
    else:
        _stroke(cv, U(up_in * 0.5 + lo_in * 0.5), _color(ident.lip_color, k=0.45),
                (0.022 + 0.02 * m.press) * px)
    if m.tuck > 0:   # upper teeth resting on the tucked lower lip (F, V)
        tt = m.tuck * 0.055
        mid = up_in * 0.5 + lo_in * 0.5 if H <= 0.004 else up_in
        xs = np.abs(x) < 0.7
        xt, mt = xw[xs], mid[xs]
        teeth = np.concatenate([h.uv(xt, vm + mt - 0.005, 0.01),
                                h.uv(xt[::-1], vm + (mt + tt * (1 - (x[xs] / 0.7) ** 4))[::-1], 0.01)])
        _fill(cv, teeth, skia.ColorSetARGB(255, 248, 246, 236))
    if m.press > 0:   # pressed lips bulge the skin at the corners
        for sx in (-1, 1):
            cp = np.array([sx * W * 1.02, sx * W * 1.1])
            _stroke(cv, h.uv(cp, vm + corner[-1] + np.array([-0.04, 0.04])),
                    _color(skin, alpha=m.press, k=0.6), 0.03 * px)


def _draw_accessories(cv, h: _Head, outline: np.ndarray):
    ident, px = h.id, h.px
    if ident.glasses:
        col = _color(ident.glasses_color)
        ew, eh = _eye_dims(ident)
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        rx, ry = ew * 1.3, eh * 1.75
        if ident.glasses == 1:
            lx, ly = np.cos(t), np.sin(t)
        else:   # squarish (superellipse) lenses
            lx = np.sign(np.cos(t)) * np.abs(np.cos(t)) ** 0.4
            ly = np.sign(np.sin(t)) * np.abs(np.sin(t)) ** 0.4
        for side in (-1, 1):
            cu, cvv = side * ident.eye_spacing, ident.eye_height
            lens = h.uv(cu + rx * lx, cvv + ry * ly, 0.14)
            cv.drawPath(_path(lens), skia.Paint(AntiAlias=True, Color=skia.ColorSetARGB(30, 200, 220, 255)))
            _stroke(cv, lens, col, 0.05 * px, close=True)
            hinge = np.array([[side * (ident.eye_spacing + rx), cvv, h.surface_z(
                np.array([side * (ident.eye_spacing + rx)]), np.array([cvv]))[0] + 0.1],
                [side * 1.0 * h.a, cvv - 0.02, 0.3 * h.c]])   # short arm: only the part in front of the ear
            _stroke(cv, h.project(hinge), col, 0.045 * px)
        inner = ident.eye_spacing - rx
        _stroke(cv, h.uv(np.array([-inner, 0.0, inner]), ident.eye_height - np.array([0.02, 0.06, 0.02]), 0.16),
                col, 0.045 * px)
    if ident.headwear == 1:   # headband across the top of the head
        u = np.linspace(-0.97, 0.97, 19) * h.a
        v0 = -0.66 * h.b - 0.08 * np.cos(u / h.a * 1.4)
        band = np.concatenate([h.uv(u, v0, 0.09), h.uv(u[::-1], (v0 - 0.16)[::-1], 0.1)])
        _fill(cv, band, _color(ident.headwear_color))
    elif ident.headwear == 2:   # beanie cuff (the crown is drawn with the hair)
        u = np.linspace(-0.98, 0.98, 19) * h.a
        v0 = -0.55 * h.b - 0.06 * np.cos(u / h.a * 1.4)
        cuff = np.concatenate([h.uv(u, v0, 0.14), h.uv(u[::-1], (v0 - 0.2)[::-1], 0.16)])
        _fill(cv, cuff, _color(ident.headwear_color, k=0.8))
