"""Compiled inner loops of the mask stage (numba, compiled on first use and cached beside this file).

Why numba: the stage's per-face work is many small loops - 7,500 regression trees per face for the 68
landmarks, image statistics over a 112x96 crop, per-pixel compositing over the mask's region. In numpy each
of those is dozens of full-array passes plus the interpreter's overhead per call, which capped the stage at
~130 crops/s/core; one compiled pass per loop is what the ≥ 200 crops/s/core target needs. numba is a
well-kept, widely used JIT (numba.pydata.org) with wheels for every platform torch has, and needs no
compiler on the user's machine. The functions here are plain loops over arrays, deterministic (no
fastmath, no parallel reductions), so the stage's bytes stay a pure function of its inputs.

Compilation costs ~1-3 s per process the first time; ``cache=True`` keeps the machine code in
``__pycache__`` for later processes (a read-only install just compiles again).
"""
from __future__ import annotations

import numpy as np
from numba import njit

# --------------------------------------------------------------------------------- regression trees


@njit(cache=True, nogil=True)
def ert_predict(gray, rects, init, split_idx1, split_idx2, split_thresh, leaf_values, anchor_idx, deltas,
                out):
    """dlib's ``shape_predictor::operator()`` for a batch of faces (see :func:`landmarks.predict_batch`).

    gray (B, H, W) uint8; rects (B, 4) float64 (left, top, right, bottom); init (P, 2) float32 mean shape in
    the box frame; split_* (L, T, S); leaf_values (L, T * (S + 1), 2P) float32; anchor_idx (L, F) int32;
    deltas (L, F, 2) float32. Writes (B, P, 2) float32 pixel coordinates into ``out``."""
    bsz, h, w = gray.shape
    levels, trees, n_split = split_idx1.shape
    n_leaf = n_split + 1
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
                while node < n_split:        # branch-free step: left when the difference passes
                    node = 2 * node + 2 - np.int64(fv[b, i1[t, node]] - fv[b, i2[t, node]] > th[t, node])
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


@njit(cache=True, nogil=True)
def _quantile_from_hist(hist, k):
    """The k-th smallest value (0-based) of the values counted in ``hist`` (bin index = value)."""
    acc = 0
    for v in range(hist.shape[0]):
        acc += hist[v]
        if acc > k:
            return v
    return hist.shape[0] - 1


@njit(cache=True, nogil=True)
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
        hist_y[:] = 0
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
        hist_g0[:] = 0
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
        hist_g1[:] = 0
        for i in range(1, h - 3):
            for j in range(1, w - 3):
                g = abs(sm[i, j + 1] - sm[i, j - 1]) + abs(sm[i + 1, j] - sm[i - 1, j])
                hist_g1[g] += 1
        n1 = (h - 4) * (w - 4)
        out[b, 6] = _quantile_from_hist(hist_g1, min(max(int(0.99 * (n1 - 1)), 0), n1 - 1)) / 16.0
