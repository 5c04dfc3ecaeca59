"""Compiled inner loops of the mask stage (numba, compiled on first use and cached beside this file): the
bottom of the flow, called by :mod:`~maskface.mask.landmarks` (the regression trees),
:mod:`~maskface.mask.render` (image statistics, geometry, light, compositing) and :mod:`~maskface.mask.face`
(the numbers the face checks decide on). This module imports nothing of the package.

Why numba: the stage's per-face work is many small loops - 7,500 regression trees per face for the 68
landmarks, image statistics over a 112x96 crop, per-pixel compositing over the mask's region. In numpy each
of those is dozens of full-array passes plus the interpreter's overhead per call, which capped the stage at
~130 crops/s/core; one compiled pass per loop is what the ≥ 200 crops/s/core target needs. numba is a
well-kept, widely used JIT (numba.pydata.org) with wheels for every platform torch has, and needs no
compiler on the user's machine. The functions here are plain loops over arrays, deterministic (no
fastmath, no parallel reductions), so the stage's bytes stay a pure function of its inputs.

Compiling all of them takes ~20-30 s, once: ``cache=True`` keeps the machine code in ``__pycache__`` beside
this file for every later process (numba falls back to the user's cache folder when that is read-only, and
``$NUMBA_CACHE_DIR`` overrides both). Editing this file invalidates its cache. Slice assignments and
``np.argsort`` are avoided in the geometry: they tripled its compile time.
"""
from __future__ import annotations

import numpy as np
from numba import njit

# error_model="numpy": a division by zero gives inf / nan (checked by the callers) instead of raising, and
# the loops carry no zero checks
_jit = njit(cache=True, nogil=True, error_model="numpy")

# --------------------------------------------------------------------------------- regression trees


@_jit
def ert_predict(gray, rects, init, split_idx1, split_idx2, split_thresh, leaf_values, anchor_idx, deltas,
                out):
    """dlib's ``shape_predictor::operator()`` for a batch of faces (see :func:`landmarks.predict_batch`).

    gray (B, H, W) uint8; rects (B, 4) float64 (left, top, right, bottom); init (P, 2) float32 mean shape in
    the box frame; split_* (L, T, S); leaf_values (L, T * (S + 1), 2P) float32; anchor_idx (L, F) int32;
    deltas (L, F, 2) float32. Writes (B, P, 2) float32 pixel coordinates into ``out``."""
    bsz, h, w = gray.shape
    levels, trees, n_split = split_idx1.shape
    n_leaf = n_split + 1
    depth = 0                        # complete trees: n_leaf = 2 ** depth
    while (1 << depth) < n_leaf:
        depth += 1
    n_feat = anchor_idx.shape[1]
    npts = init.shape[0]
    # the mean shape centred, and its spread, for the per-level similarity fit
    mx = 0.0
    my = 0.0
    for p in range(npts):
        mx += init[p, 0]
        my += init[p, 1]
    mx /= npts
    my /= npts
    sc = np.empty((npts, 2), np.float64)
    var = 0.0
    for p in range(npts):
        sc[p, 0] = init[p, 0] - mx
        sc[p, 1] = init[p, 1] - my
        var += sc[p, 0] * sc[p, 0] + sc[p, 1] * sc[p, 1]
    # Level by level for the whole batch, and within a level tree by tree across the faces: a tree's 16 leaf
    # vectors (8.7 KB) stay in L1 while every face adds one of them (face-by-face order streamed the level's
    # 4.3 MB of leaves from L3 for each face: 2.5x slower).
    shape = np.empty((bsz, 2 * npts), np.float32)
    for b in range(bsz):
        for p in range(npts):
            shape[b, 2 * p] = init[p, 0]
            shape[b, 2 * p + 1] = init[p, 1]
    fv = np.empty((bsz, n_feat), np.float32)
    for lv in range(levels):
        for b in range(bsz):
            left, top = rects[b, 0], rects[b, 1]
            sx, sy = rects[b, 2] - rects[b, 0], rects[b, 3] - rects[b, 1]
            sh = shape[b]
            # least-squares similarity mean shape -> current shape (2x2 part: [[a, -c], [c, a]])
            cx = 0.0
            cy = 0.0
            for p in range(npts):
                cx += sh[2 * p]
                cy += sh[2 * p + 1]
            cx /= npts
            cy /= npts
            sa = 0.0
            sb = 0.0
            for p in range(npts):
                dx = sh[2 * p] - cx
                dy = sh[2 * p + 1] - cy
                sa += dx * sc[p, 0] + dy * sc[p, 1]
                sb += dy * sc[p, 0] - dx * sc[p, 1]
            a = np.float32(sa / var)
            c = np.float32(sb / var)
            # the feature pixels: transformed deltas around their anchor landmarks, nearest pixel, 0 outside
            for f in range(n_feat):
                k = anchor_idx[lv, f]
                ddx = deltas[lv, f, 0]
                ddy = deltas[lv, f, 1]
                ptx = ddx * a - ddy * c + sh[2 * k]
                pty = ddx * c + ddy * a + sh[2 * k + 1]
                px = int(np.floor(left + np.float64(ptx) * sx + 0.5))
                py = int(np.floor(top + np.float64(pty) * sy + 0.5))
                if px >= 0 and px < w and py >= 0 and py < h:
                    fv[b, f] = gray[b, py, px]
                else:
                    fv[b, f] = 0.0
        # walk every tree (heap order: children of n are 2n+1 / 2n+2) for every face, add its leaf vector
        i1 = split_idx1[lv]
        i2 = split_idx2[lv]
        th = split_thresh[lv]
        lvals = leaf_values[lv]
        for t in range(trees):
            for b in range(bsz):
                node = 0
                fb = fv[b]
                for _ in range(depth):
                    if fb[i1[t, node]] - fb[i2[t, node]] > th[t, node]:
                        node = 2 * node + 1
                    else:
                        node = 2 * node + 2
                r = t * n_leaf + node - n_split
                for j in range(2 * npts):
                    shape[b, j] += lvals[r, j]
    for b in range(bsz):
        left, top = rects[b, 0], rects[b, 1]
        sx, sy = rects[b, 2] - rects[b, 0], rects[b, 3] - rects[b, 1]
        for p in range(npts):
            out[b, p, 0] = left + shape[b, 2 * p] * sx
            out[b, p, 1] = top + shape[b, 2 * p + 1] * sy


# -------------------------------------------------------------------------------------- image stats


@_jit
def _quantile_from_hist(hist, k):
    """The k-th smallest value (0-based) of the values counted in ``hist`` (bin index = value)."""
    acc = 0
    for v in range(hist.shape[0]):
        acc += hist[v]
        if acc > k:
            return v
    return hist.shape[0] - 1


@_jit
def image_stats(y, rgb, out):
    """Per image of a batch: y (B, H, W) uint8 luminance, rgb (B, H, W, 3) uint8. Writes out (B, 7) float64:
    p90 of y on every second pixel, mean R, G, B, Immerkaer's mean |Laplacian difference|, and the 99th
    percentiles of |dx| + |dy| (central differences, interior pixels) of y and of y smoothed by [1 2 1]/4 in
    x and y (valid part), the latter in units of 1/16. All quantiles are the lower order statistic, exact:
    the values are integers counted in histograms."""
    bsz, h, w = y.shape
    hist_y = np.zeros(256, np.int64)
    hist_g0 = np.zeros(511, np.int64)
    hist_g1 = np.zeros(511 * 16, np.int64)
    sm = np.empty((h - 2, w - 2), np.int32)
    for b in range(bsz):
        hist_y.fill(0)
        n = 0
        for i in range(0, h, 2):
            for j in range(0, w, 2):
                hist_y[y[b, i, j]] += 1
                n += 1
        out[b, 0] = _quantile_from_hist(hist_y, min(max(int(0.9 * (n - 1)), 0), n - 1))
        s0 = 0
        s1 = 0
        s2 = 0
        for i in range(h):
            for j in range(w):
                s0 += np.int64(rgb[b, i, j, 0])
                s1 += np.int64(rgb[b, i, j, 1])
                s2 += np.int64(rgb[b, i, j, 2])
        out[b, 1] = s0 / (h * w)
        out[b, 2] = s1 / (h * w)
        out[b, 3] = s2 / (h * w)
        out[b, 4] = 0.0
        out[b, 5] = 0.0
        out[b, 6] = 0.0
        if h <= 6 or w <= 6:
            continue
        lap = 0
        for i in range(1, h - 1):
            for j in range(1, w - 1):
                v = 0
                for di in range(-1, 2):
                    dx = np.int32(y[b, i + di, j - 1]) - 2 * np.int32(y[b, i + di, j]) + np.int32(y[b, i + di, j + 1])
                    v += -2 * dx if di == 0 else dx
                lap += abs(v)
        out[b, 4] = lap / ((h - 2) * (w - 2))
        hist_g0.fill(0)
        for i in range(1, h - 1):
            for j in range(1, w - 1):
                g = abs(np.int32(y[b, i, j + 1]) - np.int32(y[b, i, j - 1])) + abs(np.int32(y[b, i + 1, j]) - np.int32(y[b, i - 1, j]))
                hist_g0[g] += 1
        n0 = (h - 2) * (w - 2)
        out[b, 5] = _quantile_from_hist(hist_g0, min(max(int(0.99 * (n0 - 1)), 0), n0 - 1))
        for i in range(h - 2):
            for j in range(w - 2):
                acc = 0
                for di in range(3):
                    acc += (2 if di == 1 else 1) * (np.int32(y[b, i + di, j]) + 2 * np.int32(y[b, i + di, j + 1]) + np.int32(y[b, i + di, j + 2]))
                sm[i, j] = acc
        hist_g1.fill(0)
        for i in range(1, h - 3):
            for j in range(1, w - 3):
                g = abs(sm[i, j + 1] - sm[i, j - 1]) + abs(sm[i + 1, j] - sm[i - 1, j])
                hist_g1[g] += 1
        n1 = (h - 4) * (w - 4)
        out[b, 6] = _quantile_from_hist(hist_g1, min(max(int(0.99 * (n1 - 1)), 0), n1 - 1)) / 16.0


# ----------------------------------------------------------------------------------------- rendering


@_jit
def surface_coords(x0, y0, rh, rw, ax, ay, mx, my, rx, ry, inv_hw_l, inv_hw_r, u_scale, inv_d, inv_mlen):
    """Per pixel of the region (rows y0.., columns x0..): ``d`` px from the mask's midline (+ towards the
    image right; direction (rx, ry)), ``xn`` = d over the half width of its side, ``u`` = arc length on
    the cylinder (asin of xn clipped to +-0.95, times ``u_scale``), ``v`` = distance down the midline from
    the apex (direction (mx, my)) in D units, ``vn`` = the same over the midline's length. float32."""
    d = np.empty((rh, rw), np.float32)
    xn = np.empty((rh, rw), np.float32)
    u = np.empty((rh, rw), np.float32)
    v = np.empty((rh, rw), np.float32)
    vn = np.empty((rh, rw), np.float32)
    for i in range(rh):
        yy = np.float32(y0 + i - ay)
        for j in range(rw):
            xx = np.float32(x0 + j - ax)
            dd = xx * np.float32(rx) + yy * np.float32(ry)
            vp = xx * np.float32(mx) + yy * np.float32(my)
            x = dd * np.float32(inv_hw_l) if dd < 0 else dd * np.float32(inv_hw_r)
            d[i, j] = dd
            xn[i, j] = x
            u[i, j] = np.float32(np.arcsin(min(max(x, np.float32(-0.95)), np.float32(0.95))) * u_scale)
            v[i, j] = vp * np.float32(inv_d)
            vn[i, j] = vp * np.float32(inv_mlen)
    return d, xn, u, v, vn


@_jit
def _luma(img, i, j):
    """OpenCV's RGB2GRAY of one uint8 pixel (0.299 R + 0.587 G + 0.114 B, 14-bit fixed point, rounded)."""
    return (np.int32(img[i, j, 0]) * 4899 + np.int32(img[i, j, 1]) * 9617 + np.int32(img[i, j, 2]) * 1868
            + 8192) >> 14


@_jit
def _covered_grid(img, a_body, x0, y0, step):
    """The points of the grid of every ``step``-th pixel (from ``step // 2``) of ``img`` where the mask's
    coverage ``a_body`` (over the region whose corner is (x0, y0)) exceeds 0.5: their image rows, columns
    and lumas, in row-major order."""
    o = step // 2
    rh, rw = a_body.shape
    h, w = img.shape[0], img.shape[1]
    gh, gw = (h - o + step - 1) // step, (w - o + step - 1) // step
    gy0 = max(-(-(y0 - o) // step), 0)
    gx0 = max(-(-(x0 - o) // step), 0)
    size = max(gh - gy0, 0) * max(gw - gx0, 0)
    ys = np.empty(size, np.int64)
    xs = np.empty(size, np.int64)
    lv = np.empty(size, np.int64)
    n = 0
    for gi in range(gy0, gh):
        ry = gi * step + o - y0
        if ry >= rh:
            break
        for gj in range(gx0, gw):
            rx = gj * step + o - x0
            if rx >= rw:
                break
            if a_body[ry, rx] > 0.5:
                ys[n] = gi * step + o
                xs[n] = gj * step + o
                lv[n] = _luma(img, ys[n], xs[n])
                n += 1
    return ys[:n], xs[:n], lv[:n]


@_jit
def light_normal_equations(img, a_body, x0, y0, step):
    """The weighted least-squares system of the face-light fit (see ``render._face_light``), over the grid
    of every ``step``-th pixel (from ``step // 2``) of the RGB image ``img``; ``a_body`` is the mask's
    coverage over the region whose corner is (x0, y0). Grid points under the mask (coverage > 0.5) between
    their 20th and 98th percentile of luminance (lower order statistics, as a sort gives) enter with
    y = ln(luma + 5) and the monomials [1, x, y, x^2, xy, y^2] of image-normalised coordinates.
    Returns (A (6, 6), b (6,), sum of y, points used, points covered)."""
    h, w = img.shape[0], img.shape[1]
    ys, xs, lv = _covered_grid(img, a_body, x0, y0, step)
    n = len(lv)
    A = np.zeros((6, 6), np.float64)
    bv = np.zeros(6, np.float64)
    if n < 12:
        return A, bv, 0.0, 0, n
    hist = np.zeros(256, np.int64)
    for k in range(n):
        hist[lv[k]] += 1
    lo = 0
    hi = 0
    k_lo = int(0.2 * (n - 1))
    k_hi = int(0.98 * (n - 1))
    acc = 0
    found_lo = False
    for val in range(256):
        acc += hist[val]
        if not found_lo and acc > k_lo:
            lo = val
            found_lo = True
        if acc > k_hi:
            hi = val
            break
    s = 1.0 / max(h, w)
    m = np.empty(6, np.float64)
    ysum = 0.0
    used = 0
    for k in range(n):
        if lv[k] >= lo and lv[k] <= hi:
            X = (xs[k] - w / 2) * s
            Y = (ys[k] - h / 2) * s
            m[0] = 1.0
            m[1] = X
            m[2] = Y
            m[3] = X * X
            m[4] = X * Y
            m[5] = Y * Y
            yv = np.log(lv[k] + 5.0)
            for p in range(6):
                bv[p] += m[p] * yv
                for q in range(6):
                    A[p, q] += m[p] * m[q]
            ysum += yv
            used += 1
    return A, bv, ysum, used, n


@_jit
def light_field(coef, ref, x0, y0, rh, rw, h, w):
    """exp(quadratic fit - ref) over the region, the exponent clipped to ln 0.6 .. ln 1.45. float32."""
    s = 1.0 / max(h, w)
    out = np.empty((rh, rw), np.float32)
    for i in range(rh):
        Y = (y0 + i - h / 2) * s
        cy = coef[0] + coef[2] * Y + coef[5] * Y * Y - ref
        cx = coef[1] + coef[4] * Y
        for j in range(rw):
            X = (x0 + j - w / 2) * s
            f = cy + X * (cx + coef[3] * X)
            out[i, j] = np.float32(np.exp(min(max(f, -0.51), 0.372)))
    return out


@_jit
def shade_albedo(rgb, shade, light, k):
    """In place: planar rgb (3, H, W) times shade x light x k[c], capped at 1."""
    _, rh, rw = rgb.shape
    for c in range(3):
        kc = np.float32(k[c])
        for i in range(rh):
            for j in range(rw):
                rgb[c, i, j] = min(rgb[c, i, j] * (shade[i, j] * light[i, j]) * kc, np.float32(1.0))


@_jit
def composite(roi, rgb, alpha, a_body, noise, noise_sd, step, out, occ):
    """The mask over the photo region: ``roi`` (H, W, 3) uint8 photo pixels; ``rgb`` (3, H, W) the mask's
    premultiplied (blurred) colour, ``alpha`` its (blurred) coverage, ``a_body`` the body's sharp coverage;
    sensor noise ``noise`` x ``noise_sd`` x alpha added to the colour; a contact shadow on the skin: the
    body's coverage smeared 1-3 ``step`` px downwards, outside the body, darkening by up to 45 %.
    Writes ``out`` (H, W, 3) uint8 (rounded, clipped) and ``occ`` (H, W) bool (alpha >= 0.5)."""
    rh, rw = alpha.shape
    for i in range(rh):
        for j in range(rw):
            sh = np.float32(0.0)
            for kk in range(1, 4):
                if kk * step < rh and i >= kk * step:
                    sh += a_body[i - kk * step, j]
            sh = sh * np.float32(1.0 / 3.0) - a_body[i, j]
            if sh < 0:
                sh = np.float32(0.0)
            a = alpha[i, j]
            keep = (np.float32(1.0) - np.float32(0.45) * sh) * (np.float32(1.0) - a)
            nz = noise[i, j] * (a * np.float32(noise_sd))
            for c in range(3):
                val = np.float32(roi[i, j, c]) * keep + (rgb[c, i, j] + nz) * np.float32(255.0) + np.float32(0.5)
                if val > 255.0:
                    val = np.float32(255.0)
                elif val < 0.0:
                    val = np.float32(0.0)
                out[i, j, c] = np.uint8(val)
            occ[i, j] = a >= 0.5


# ------------------------------------------------------------------------------------- face checks

YAW_CAL = 1.41          # see landmarks.yaw_from_landmarks
_YAW_EYE = YAW_CAL * 26.0 / 86.6
_YAW_MOUTH = YAW_CAL * 24.1 / 57.8


@_jit
def yaw_deg(p):
    """Head yaw from the nose tip's offset between eye corners and mouth corners (landmarks.yaw_from_landmarks)."""
    ex = p[45, 0] - p[36, 0]
    ey = p[45, 1] - p[36, 1]
    n = np.hypot(ex, ey)
    if n < 1e-9:
        return np.nan
    ex /= n
    ey /= n
    t = 0.0
    for k in range(2):
        a, b, ratio = (36, 45, _YAW_EYE) if k == 0 else (48, 54, _YAW_MOUTH)
        ua = p[a, 0] * ex + p[a, 1] * ey
        ub = p[b, 0] * ex + p[b, 1] * ey
        width = ub - ua
        if width <= 1e-9:
            return 90.0
        t += ((ua + ub) / 2 - (p[30, 0] * ex + p[30, 1] * ey)) / width / ratio
    return np.degrees(np.arctan(t / 2))


@_jit
def _eye_centres(p):
    """Centres of the left (36-41) and right (42-47) eye landmarks: (lx, ly, rx, ry)."""
    elx = 0.0
    ely = 0.0
    erx = 0.0
    ery = 0.0
    for k in range(6):
        elx += p[36 + k, 0]
        ely += p[36 + k, 1]
        erx += p[42 + k, 0]
        ery += p[42 + k, 1]
    return elx / 6.0, ely / 6.0, erx / 6.0, ery / 6.0


@_jit
def face_metrics(p, h, w, t5, use_t5):
    """The numbers face.face_checks decides on, for landmarks p (68, 2) float64 of a face in an h x w
    image: (eye distance D, brow/eye/nose/mouth points more than 0.1 D outside the image, mouth below the
    eyes in D, nose tip's share of the way from the eyes to the mouth, mean distance of the five points to
    the template ``t5`` in eye-mouth distances (when ``use_t5``), yaw in degrees)."""
    elx, ely, erx, ery = _eye_centres(p)
    D = np.hypot(erx - elx, ery - ely)
    m = 0.1 * D
    out = 0
    for k in range(17, 68):
        if p[k, 0] < -m or p[k, 0] > w - 1 + m or p[k, 1] < -m or p[k, 1] > h - 1 + m:
            out += 1
    emx = (elx + erx) / 2
    emy = (ely + ery) / 2
    mmx = (p[48, 0] + p[54, 0]) / 2
    mmy = (p[48, 1] + p[54, 1]) / 2
    mouth_v = 0.0
    tip = 0.0
    if D > 0:
        exx = (erx - elx) / D
        exy = (ery - ely) / D
        mouth_v = ((mmx - emx) * -exy + (mmy - emy) * exx) / D
    emdx = mmx - emx
    emdy = mmy - emy
    tip = ((p[30, 0] - emx) * emdx + (p[30, 1] - emy) * emdy) / max(emdx * emdx + emdy * emdy, 1e-9)
    err = 0.0
    if use_t5:
        scale = np.hypot((t5[3, 0] + t5[4, 0]) / 2 - (t5[0, 0] + t5[1, 0]) / 2,
                         (t5[3, 1] + t5[4, 1]) / 2 - (t5[0, 1] + t5[1, 1]) / 2)
        pts = ((elx, ely), (erx, ery), (p[30, 0], p[30, 1]), (p[48, 0], p[48, 1]), (p[54, 0], p[54, 1]))
        for k in range(5):
            err += np.hypot(pts[k][0] - t5[k, 0], pts[k][1] - t5[k, 1])
        err = err / 5.0 / scale
    return D, out, mouth_v, tip, err, yaw_deg(p)


# ---------------------------------------------------------------------------------------- geometry


@_jit
def _keep_clear(curve, lm, groups, glen, margins, above, ox, oy, exx, exy, eyx, eyy, D):
    """Keeps the top edge clear of landmarks, for every group of ``groups`` (rows of landmark indices, ``glen``
    used) at once, in place: points of ``curve`` are pushed along ey (down, or up when ``above``) until they lie
    ``margins[g]`` px beyond the polyline through the group's landmarks, over its extent across the face
    (+- 0.1 D). Works in face coordinates (u along ex, v along ey); the curve is rewritten only if a point
    moved."""
    n = curve.shape[0]
    cu = np.empty(n)
    cv = np.empty(n)
    for i in range(n):
        dx = curve[i, 0] - ox
        dy = curve[i, 1] - oy
        cu[i] = dx * exx + dy * exy
        cv[i] = dx * eyx + dy * eyy
    ext = 0.1 * D
    sgn = -1.0 if above else 1.0
    moved = False
    gu = np.empty(groups.shape[1] + 2)
    gv = np.empty(groups.shape[1] + 2)
    pu = np.empty(groups.shape[1])
    pv = np.empty(groups.shape[1])
    for g in range(groups.shape[0]):
        m = glen[g]
        for k in range(m):
            dx = lm[groups[g, k], 0] - ox
            dy = lm[groups[g, k], 1] - oy
            pu[k] = dx * exx + dy * exy
            pv[k] = dx * eyx + dy * eyy
        for k in range(m):                    # insertion sort by u (a handful of points)
            x = pu[k]
            y = sgn * (pv[k] + sgn * margins[g])
            q = k
            while q > 0 and gu[q] > x:
                gu[q + 1] = gu[q]
                gv[q + 1] = gv[q]
                q -= 1
            gu[q + 1] = x
            gv[q + 1] = y
        gu[0] = gu[1] - ext
        gv[0] = gv[1]
        gu[m + 1] = gu[m] + ext
        gv[m + 1] = gv[m]
        for i in range(n):
            x = cu[i]
            if x < gu[0] or x > gu[m + 1]:
                continue                      # outside the polyline's extent: np.interp's -inf
            j = 0
            while j < m and x > gu[j + 1]:
                j += 1
            span = gu[j + 1] - gu[j]
            lim = gv[j] if span <= 0 else gv[j] + (gv[j + 1] - gv[j]) * (x - gu[j]) / span
            if sgn * cv[i] < lim:
                cv[i] = sgn * lim
                moved = True
    if moved:
        for i in range(n):
            curve[i, 0] = ox + cu[i] * exx + cv[i] * eyx
            curve[i, 1] = oy + cu[i] * exy + cv[i] * eyy


@_jit
def _jaw_normals(lm):
    """Unit normals of the jaw contour (points 0-16), turned away from the nose centroid (27-35)."""
    cx = 0.0
    cy = 0.0
    for k in range(27, 36):
        cx += lm[k, 0]
        cy += lm[k, 1]
    cx /= 9.0
    cy /= 9.0
    normals = np.empty((17, 2))
    for k in range(17):
        a = max(k - 1, 0)
        b = min(k + 1, 16)
        tx = lm[b, 0] - lm[a, 0]
        ty = lm[b, 1] - lm[a, 1]
        nx, ny = ty, -tx
        nn = max(np.hypot(nx, ny), 1e-9)
        nx /= nn
        ny /= nn
        s = (lm[k, 0] - cx) * nx + (lm[k, 1] - cy) * ny
        if s < 0:
            nx, ny = -nx, -ny
        normals[k, 0] = nx
        normals[k, 1] = ny
    return normals


@_jit
def _jaw_points(lm, normals, c_top, c_lo_l, c_lo_r, n1, n_half, side, chin, chin_point, D):
    """Every jaw point the outline needs, at fractional jaw indices, offset outwards along the contour normal
    by a margin growing from ``side`` at the corners to ``chin`` at the chin (D units): contour left / right
    (``n1`` each), lower contour left / right (``n_half`` each), sides left / right (5 each), jaw 3, 8, 13."""
    span = max(8.0 - c_top, 1e-6)
    nidx = 2 * n1 + 2 * n_half + 13
    pts = np.empty((nidx, 2))
    for q in range(nidx):
        if q < n1:
            i = c_top + (8.0 - c_top) * (q / (n1 - 1))
        elif q < 2 * n1:
            i = 8.0 + (8.0 - c_top) * ((q - n1) / (n1 - 1))
        elif q < 2 * n1 + n_half:
            i = c_lo_l + (8.0 - c_lo_l) * ((q - 2 * n1) / (n_half - 1))
        elif q < 2 * n1 + 2 * n_half:
            i = 8.0 + (c_lo_r - 8.0) * ((q - 2 * n1 - n_half) / (n_half - 1))
        elif q < 2 * n1 + 2 * n_half + 5:
            i = c_top + (c_lo_l - c_top) * ((q - 2 * n1 - 2 * n_half) / 4.0)
        elif q < 2 * n1 + 2 * n_half + 10:
            i = (16.0 - c_top) + (c_lo_r - 16.0 + c_top) * ((q - 2 * n1 - 2 * n_half - 5) / 4.0)
        else:
            i = 3.0 + 5.0 * (q - 2 * n1 - 2 * n_half - 10)
        d8 = abs(i - 8.0)
        wgt = min(max(1.0 - d8 / span, 0.0), 1.0) ** 1.5
        off = (side + (chin - side) * wgt + chin_point * min(max(1.0 - d8 / 2.5, 0.0), 1.0)) * D
        ic = min(max(i, 0.0), 16.0)
        lo = int(ic)
        hi = min(lo + 1, 16)
        f = ic - lo
        nx = normals[lo, 0] * (1 - f) + normals[hi, 0] * f
        ny = normals[lo, 1] * (1 - f) + normals[hi, 1] * f
        nn = max(np.hypot(nx, ny), 1e-9)
        pts[q, 0] = lm[lo, 0] * (1 - f) + lm[hi, 0] * f + nx / nn * off
        pts[q, 1] = lm[lo, 1] * (1 - f) + lm[hi, 1] * f + ny / nn * off
    return pts


@_jit
def _top_edge(cont_l, cont_r, n1, n_half, apx, apy, rx, ry, exx, exy, sgx, sgy, rnd, corner_in):
    """The top edge, left corner -> apex -> right corner: two cubics whose tangent at the apex lies between
    pointed (towards the corner) and round (along the eye line), by ``rnd``; corners pulled towards the
    midline (normal (rx, ry)) by ``corner_in``, the curve sagging by (sgx, sgy) between corner and apex."""
    top = np.empty((2 * n_half - 1, 2))
    for half in range(2):
        if half == 0:
            c0x, c0y = cont_l[0, 0], cont_l[0, 1]
            sgn = -1.0
        else:
            c0x, c0y = cont_r[n1 - 1, 0], cont_r[n1 - 1, 1]
            sgn = 1.0
        pr = ((c0x - apx) * rx + (c0y - apy) * ry) * corner_in
        c0x -= rx * pr
        c0y -= ry * pr
        tcx = c0x - apx
        tcy = c0y - apy
        lc = max(np.hypot(tcx, tcy), 1e-9)
        tnx = tcx * ((1 - rnd) / lc) + exx * (sgn * rnd)
        tny = tcy * ((1 - rnd) / lc) + exy * (sgn * rnd)
        tn = max(np.hypot(tnx, tny), 1e-9)
        tnx /= tn
        tny /= tn
        p1x = c0x + (apx - c0x) * 0.35 + sgx
        p1y = c0y + (apy - c0y) * 0.35 + sgy
        p2x = apx + tnx * (lc * 0.35)
        p2y = apy + tny * (lc * 0.35)
        for q in range(n_half):
            t = q / (n_half - 1)
            b0 = (1 - t) ** 3
            b1 = 3 * (1 - t) ** 2 * t
            b2 = 3 * (1 - t) * t * t
            b3 = t ** 3
            x = b0 * c0x + b1 * p1x + b2 * p2x + b3 * apx
            y = b0 * c0y + b1 * p1y + b2 * p2y + b3 * apy
            if half == 0:
                top[q, 0] = x
                top[q, 1] = y
            elif q < n_half - 1:
                top[2 * n_half - 2 - q, 0] = x
                top[2 * n_half - 2 - q, 1] = y
    return top


@_jit
def _outline(top, cont_l, cont_r, n1):
    """The closed body polygon: the top edge, the right contour upwards, the left contour downwards."""
    nt = top.shape[0]
    outline = np.empty((nt + 2 * (n1 - 2) + 1, 2))
    for q in range(outline.shape[0]):
        for c in range(2):
            if q < nt:
                outline[q, c] = top[q, c]
            elif q < nt + n1 - 2:
                outline[q, c] = cont_r[n1 - 2 - (q - nt), c]
            else:
                outline[q, c] = cont_l[n1 - 1 - (q - nt - (n1 - 2)), c]
    return outline


@_jit
def mask_geometry(lm, tg, wg, groups_b, glen_b, margins_b, groups_a, glen_a, margins_a, jitter):
    """The mask outline of one type and wear on a face (render.build_geometry, which documents the shape).

    lm (68, 2) float64. tg: the type's [top_sag, round, side_off, chin_off, corner_in, side_len,
    chin_point]; wg: the wear's [apex landmark a, b, fraction, c_top, chin_extra]; groups_b / groups_a:
    landmark polylines the top edge stays below / above (rows padded, ``glen`` used, margins in px);
    jitter: [apex, corner, side, chin, sag] per-image offsets.
    Returns (top, bottom, outline, side_l, side_r, apex, low, hw_l, hw_r)."""
    # face frame: eye centres, D, ex along the eye line, ey down
    elx, ely, erx, ery = _eye_centres(lm)
    D = np.hypot(erx - elx, ery - ely)
    exx = (erx - elx) / D
    exy = (ery - ely) / D
    eyx = -exy
    eyy = exx
    ox = (elx + erx) / 2
    oy = (ely + ery) / 2
    top_sag, rnd, side_off, chin_off, corner_in, side_len, chin_point = tg[0], tg[1], tg[2], tg[3], tg[4], tg[5], tg[6]
    ia, ib = int(wg[0]), int(wg[1])
    fa = wg[2] + jitter[0]
    apx = lm[ia, 0] + (lm[ib, 0] - lm[ia, 0]) * fa
    apy = lm[ia, 1] + (lm[ib, 1] - lm[ia, 1]) * fa
    c_top = min(max(wg[3] + jitter[1], 0.0), 6.0)
    n_half = 13 if D < 60 else 25
    k = max(int(round((8.0 - c_top) * 3)), 4)
    c_lo_l = min(c_top + side_len, 7.0)
    c_lo_r = max(16.0 - c_top - side_len, 9.0)
    n1 = k + 1
    pts = _jaw_points(lm, _jaw_normals(lm), c_top, c_lo_l, c_lo_r, n1, n_half, side_off + jitter[2],
                      chin_off + wg[4] + jitter[3], chin_point, D)
    cont_l = pts[:n1]
    cont_r = pts[n1:2 * n1]
    i0 = 2 * n1
    bottom = np.empty((2 * n_half - 1, 2))
    for q in range(2 * n_half - 1):           # lower contour: left half, then right half without its start
        src = i0 + q if q < n_half else i0 + q + 1
        bottom[q, 0] = pts[src, 0]
        bottom[q, 1] = pts[src, 1]
    i0 += 2 * n_half
    side_l = np.empty((5, 2))
    side_r = np.empty((5, 2))
    for q in range(5):
        for c in range(2):
            side_l[q, c] = pts[i0 + q, c]
            side_r[q, c] = pts[i0 + 5 + q, c]
    m3x, m3y = pts[i0 + 10, 0], pts[i0 + 10, 1]
    lowx, lowy = pts[i0 + 11, 0], pts[i0 + 11, 1]
    m13x, m13y = pts[i0 + 12, 0], pts[i0 + 12, 1]
    # midline (apex -> lowest point) and its normal towards the image-right half of the face
    mx = lowx - apx
    my = lowy - apy
    ml = max(np.hypot(mx, my), 1e-9)
    rx = -my / ml
    ry = mx / ml
    if rx * exx + ry * exy < 0:
        rx, ry = -rx, -ry
    # top edge: two cubics corner -> apex, sagging between them
    sgx = eyx * (top_sag + jitter[4]) * D
    sgy = eyy * (top_sag + jitter[4]) * D
    top = _top_edge(cont_l, cont_r, n1, n_half, apx, apy, rx, ry, exx, exy, sgx, sgy, rnd, corner_in)
    _keep_clear(top, lm, groups_b, glen_b, margins_b, False, ox, oy, exx, exy, eyx, eyy, D)
    if groups_a.shape[0]:
        _keep_clear(top, lm, groups_a, glen_a, margins_a, True, ox, oy, exx, exy, eyx, eyy, D)
    outline = _outline(top, cont_l, cont_r, n1)
    nt = top.shape[0]
    for c in range(2):
        side_l[0, c] = top[0, c]
        side_r[0, c] = top[nt - 1, c]
    hw_l = max((apx - m3x) * rx + (apy - m3y) * ry, 0.2 * D)
    hw_r = max((m13x - apx) * rx + (m13y - apy) * ry, 0.2 * D)
    apex = np.array([apx, apy])
    low = np.array([lowx, lowy])
    return top, bottom, outline, side_l, side_r, apex, low, hw_l, hw_r
