"""Embedders (registry, dlib-resnet, SphereFace checkpoints) and the features Parquet."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from maskface.evaluate import FeatureTable, ProtocolSettings
from maskface.features import (EMBEDDERS, CHECKPOINT_FORMAT, FaceInput, SphereFaceEmbedder, center_box,
                               embed_all, features_frame, load_checkpoint, make_embedder, mtcnn_to_dlib_box,
                               register_arch, save_checkpoint, write_features)
from maskface.manifest import read_provenance


class ChannelMeans(torch.nn.Module):
    """Feature = per-channel mean, and the mean of the left half minus the right half (flip-sensitive)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)))

    def forward(self, x):
        w = x.shape[3]
        lr = x[..., : w // 2].mean((1, 2, 3)) - x[..., w // 2:].mean((1, 2, 3))
        return self.scale * torch.cat([x.mean((2, 3)), lr[:, None]], dim=1)


class TinyNet(torch.nn.Module):
    """A randomly initialised conv net with SphereFace's input/output shapes (112x96 -> 512)."""

    def __init__(self, dim: int = 512):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4)
        self.prelu = torch.nn.PReLU(8)
        self.fc = torch.nn.Linear(8 * 28 * 24, dim)

    def forward(self, x):
        return self.fc(self.prelu(self.conv(x)).flatten(1))


register_arch("test-channel-means", ChannelMeans)
register_arch("test-tiny", TinyNet)


def _crops(n=5, seed=0, h=112, w=96):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_registry():
    assert {"dlib-resnet", "dlib", "sphereface"} <= set(EMBEDDERS)
    with pytest.raises(KeyError):
        make_embedder("no-such-model")


def test_channel_order_normalisation_and_flip(tmp_path):
    ck = tmp_path / "cm.pt"
    mean, std = [10.0, 20.0, 30.0], [2.0, 4.0, 8.0]
    save_checkpoint(ck, ChannelMeans(), arch="test-channel-means", feature_dim=4,
                    input={"channel_order": "BGR", "mean": mean, "std": std})
    emb = SphereFaceEmbedder(ck, flip="concat", device="cpu")
    img = np.zeros((112, 96, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 50, 100, 200  # R, G, B
    img[:, :48, 0] = 60  # left half redder
    f = emb.embed([FaceInput(img)])[0]
    assert f.shape == (8,) and emb.dim == 8
    # BGR order: network channel 0 is blue; mean/std are given in the network's channel order
    r_mean = (60 + 50) / 2
    np.testing.assert_allclose(f[:3], [(200 - 10) / 2, (100 - 20) / 4, (r_mean - 30) / 8], rtol=1e-6)
    lr = ((60 - 30) / 8 - (50 - 30) / 8) / 3  # left minus right, averaged over the 3 channels
    assert f[3] == pytest.approx(lr, rel=1e-5)
    np.testing.assert_allclose(f[4:7], f[:3], rtol=1e-6)  # flipped copy: same channel means...
    assert f[7] == pytest.approx(-lr, rel=1e-5)  # ...mirrored left/right
    s = SphereFaceEmbedder(ck, flip="sum", device="cpu").embed([FaceInput(img)])[0]
    np.testing.assert_allclose(s, f[:4] + f[4:], rtol=1e-6, atol=1e-6)
    rgb = tmp_path / "rgb.pt"
    save_checkpoint(rgb, ChannelMeans(), arch="test-channel-means", feature_dim=4,
                    input={"channel_order": "RGB", "mean": mean, "std": std})
    g = SphereFaceEmbedder(rgb, flip="none", device="cpu").embed([FaceInput(img)])[0]
    assert g[0] == pytest.approx((r_mean - 10) / 2)


def test_state_dict_and_torchscript_forms_agree(tmp_path):
    torch.manual_seed(0)
    net = TinyNet()
    sd = tmp_path / "tiny.pt"
    save_checkpoint(sd, net, arch="test-tiny", feature_dim=512, meta={"iteration": 28000})
    raw = torch.load(sd, weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["input"]["height"] == 112 and raw["input"]["width"] == 96
    ts = tmp_path / "tiny.ts"
    meta = {k: v for k, v in raw.items() if k not in ("arch", "arch_kwargs", "state_dict")}
    torch.jit.save(torch.jit.script(net), str(ts), _extra_files={"maskface.json": json.dumps(meta)})
    crops = [FaceInput(c) for c in _crops(7)]
    e1 = SphereFaceEmbedder(sd, device="cpu", batch_size=3)
    e2 = SphereFaceEmbedder(ts, device="cpu", batch_size=4)
    f1, f2 = e1.embed(crops), e2.embed(crops)
    assert f1.shape == (7, 1024)
    np.testing.assert_allclose(f1, f2, rtol=1e-4, atol=1e-5)
    # batching does not change features; the flipped half really is the flipped image's feature
    x = torch.from_numpy(e1.preprocess([crops[0].image]))
    with torch.no_grad():
        np.testing.assert_allclose(f1[0, 512:], net(torch.flip(x, dims=[3]))[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(SphereFaceEmbedder(sd, device="cpu", batch_size=1).embed(crops), f1,
                               rtol=1e-4, atol=1e-5)
    assert e1.eval_settings == ProtocolSettings(mean_subtraction=True, metric="cosine")
    assert e1.describe()["meta"] == {"iteration": 28000}


def test_checkpoint_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": TinyNet().state_dict()}, bad)
    with pytest.raises(ValueError, match="not a maskface-embedder"):
        load_checkpoint(bad)
    ck = tmp_path / "tiny.pt"
    save_checkpoint(ck, TinyNet(), arch="test-tiny", feature_dim=512)
    emb = SphereFaceEmbedder(ck, device="cpu")
    with pytest.raises(ValueError, match="112x96"):
        emb.embed([FaceInput(np.zeros((112, 112, 3), np.uint8))])  # an arcface crop, or a source image
    wrong_dim = tmp_path / "wrong.pt"
    save_checkpoint(wrong_dim, TinyNet(), arch="test-tiny", feature_dim=256)
    with pytest.raises(ValueError, match="feature_dim"):
        SphereFaceEmbedder(wrong_dim, device="cpu").embed([FaceInput(_crops(1)[0])])
    unknown = tmp_path / "unknown.pt"
    save_checkpoint(unknown, TinyNet(), arch="no-such-arch", feature_dim=512)
    with pytest.raises(KeyError, match="no-such-arch"):
        load_checkpoint(unknown)


def test_module_callable_arch(tmp_path):
    ck = tmp_path / "lin.pt"

    class Flat(torch.nn.Sequential):
        pass

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 112 * 96, 16))
    save_checkpoint(ck, net, arch="torch.nn:Sequential", feature_dim=16)
    with pytest.raises(RuntimeError):  # an empty Sequential has none of the saved weights: strict loading
        load_checkpoint(ck)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_sphereface_on_cuda_matches_cpu(tmp_path):
    ck = tmp_path / "tiny.pt"
    save_checkpoint(ck, TinyNet(), arch="test-tiny", feature_dim=512)
    crops = [FaceInput(c) for c in _crops(4)]
    np.testing.assert_allclose(SphereFaceEmbedder(ck, device="cuda").embed(crops),
                               SphereFaceEmbedder(ck, device="cpu").embed(crops), rtol=1e-3, atol=1e-4)


def test_features_parquet_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 128)).astype(np.float32)
    ids = [f"p{i}/p{i}_0001.jpg" for i in range(3)]
    df = pd.concat([features_frame(ids, "clean", x[:3], ["mtcnn", "mtcnn", "fallback_center"]),
                    features_frame(ids, "masked", x[3:], ["mtcnn"] * 3)])
    path = tmp_path / "features.parquet"
    write_features(df, path, {"stage": "features", "embedder": {"name": "dlib-resnet"}})
    schema = pq.read_schema(path)
    assert schema.field("feature").type == pa.list_(pa.float32(), 128)
    assert read_provenance(path)["embedder"]["name"] == "dlib-resnet"
    t = FeatureTable.read(path)
    assert t.variants == {"clean", "masked"}
    np.testing.assert_array_equal(t.lookup([ids[2], "missing/x.jpg"], "masked")[0], x[5])
    assert np.isnan(t.lookup(["missing/x.jpg"], "clean")).all()
    with pytest.raises(ValueError):
        features_frame(ids, "half-masked", x[:3])


def test_boxes():
    assert center_box(250, 250) == pytest.approx((78.75, 63.75, 171.25, 186.25))
    assert mtcnn_to_dlib_box((100, 100, 200, 300), (-0.1, 0.1, 1.0, 0.9)) == pytest.approx((90, 120, 200, 280))


# ------------------------------------------------------------------------------------- real LFW faces

def _mtcnn_boxes(images):
    from facenet_pytorch import MTCNN

    m = MTCNN(min_face_size=20, thresholds=[0.6, 0.7, 0.9], factor=0.85, keep_all=True, device="cpu")
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 threads on MTCNN's tiny convolutions were 10x slower
    try:
        for im in images:
            boxes, _ = m.detect(im)
            c = (boxes[:, :2] + boxes[:, 2:]) / 2 - np.array([im.shape[1], im.shape[0]]) / 2
            out.append(boxes[int(np.argmin((c ** 2).sum(1)))])
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.lfw
@pytest.mark.slow
@pytest.mark.parametrize("name", ["dlib-resnet", "dlib"])
def test_dlib_resnet_on_real_lfw_pairs(lfw, name):
    """The torch module (dlib-resnet) and dlib's own run of the network (dlib), on the same chips."""
    from maskface.datasets import parse_pairs
    from maskface.imageio import load_rgb

    pairs = parse_pairs(lfw / "pairs.txt")
    gen = pairs[pairs.same].iloc[:3]
    imp = pairs[~pairs.same].iloc[:3]
    ids = list(dict.fromkeys(list(gen.a) + list(gen.b) + list(imp.a) + list(imp.b)))
    images = {i: load_rgb(lfw / "images_deepfunneled" / i) for i in ids}
    boxes = dict(zip(ids, _mtcnn_boxes([images[i] for i in ids])))
    emb = make_embedder(name)
    assert emb.eval_settings == ProtocolSettings(mean_subtraction=False, metric="euclidean")
    assert emb.chip(FaceInput(images[ids[0]], boxes[ids[0]])).shape == (150, 150, 3)
    df = embed_all(emb, ids, lambda i: FaceInput(images[i], boxes[i]), "clean", chunk=4)
    assert set(df.face) == {"mtcnn"}
    t = FeatureTable.from_frame(df)
    d_gen = np.linalg.norm(t.lookup(list(gen.a), "clean") - t.lookup(list(gen.b), "clean"), axis=1)
    d_imp = np.linalg.norm(t.lookup(list(imp.a), "clean") - t.lookup(list(imp.b), "clean"), axis=1)
    assert (d_gen < 0.6).all(), d_gen  # dlib's own threshold separates these pairs
    assert (d_imp > 0.6).all(), d_imp
    # flip: the mean of the descriptors of the chip and of its mirror image
    face = FaceInput(images[ids[0]], boxes[ids[0]])
    chip = emb.chip(face)
    emb.flip = True
    try:
        f_flip = emb.embed([face])[0]
    finally:
        emb.flip = False
    mirrored = emb.describe_chips_raw([np.ascontiguousarray(chip[:, ::-1])])[0]
    np.testing.assert_allclose(f_flip, (t.lookup([ids[0]], "clean")[0] + mirrored) / 2, atol=1e-5)
    assert np.linalg.norm(mirrored - t.lookup([ids[0]], "clean")[0]) > 1e-3  # the mirror image really differs
    # no detection: the centred fallback box still finds the (centred) LFW face
    fb = emb.embed([FaceInput(images[gen.a.iloc[0]], None)])[0]
    assert np.linalg.norm(fb - t.lookup([gen.a.iloc[0]], "clean")[0]) < 0.3


def test_crop_to_source_inverts_the_alignment_transform():
    from maskface.align import TEMPLATES, similarity_transform, transform_points
    from maskface.features import crop_to_source

    src = np.array([[80.0, 110], [140, 105], [112, 140], [88, 170], [136, 166]])
    m = similarity_transform(src, TEMPLATES["sphereface_112x96"][0])
    pts = np.random.default_rng(1).uniform(0, 112, (68, 2))
    np.testing.assert_allclose(transform_points(m, crop_to_source(pts, m.ravel())), pts, atol=1e-9)


@pytest.mark.lfw
def test_masked_source_faces_redraw_the_stage_mask(lfw):
    """dlib-resnet's masked variant: the source photo with the mask stage's mask redrawn from the stage's
    landmarks and random choices. Inside the crop it is the stage's mask (occlusion IoU), outside the mask the
    photo is untouched, and a face the stage skipped gets no masked face."""
    import cv2

    from maskface import align as A
    from maskface.features import masked_source_loader
    from maskface.imageio import load_rgb
    from maskface.mask import mask_image

    ids = ["Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "Abdullah_Gul/Abdullah_Gul_0006.jpg"]
    rgbs = [load_rgb(lfw / "images_deepfunneled" / i) for i in ids]
    torch.set_num_threads(1)
    det = A.Detector(20, (0.6, 0.7, 0.9), 0.85, "cpu").detect(np.stack(rgbs))
    arows, mrows, stage = [], [], {}
    for i, rgb, (boxes, points) in zip(ids, rgbs, det):
        k = A.select_face(boxes, rgb.shape[:2], "center")
        crop, m = A.align_face(rgb, points[k], "sphereface_112x96")
        res = mask_image(crop, image_id=i, aligned=True)   # the mask stage's drawing of an aligned crop
        assert res.status == "ok", res.reason
        stage[i] = (m, res.occlusion)
        f = res.faces[0]
        arows.append({"image_id": i, "status": "ok", "bbox": boxes[k, :4].tolist(), "transform": m.ravel().tolist()})
        mrows.append({k2: f[k2] for k2 in ("mask_type", "mask_color", "mask_texture", "wear", "landmarks68")}
                     | {"image_id": i, "status": "ok"})
    mrows[1]["status"] = "skipped"
    ids_ok, load = masked_source_loader(lfw / "images_deepfunneled", pd.DataFrame(arows), pd.DataFrame(mrows), {})
    assert ids_ok == ids[:1]
    face = load(ids[0])
    np.testing.assert_allclose(face.bbox, arows[0]["bbox"])
    m, occ = stage[ids[0]]
    changed = np.abs(face.image.astype(int) - rgbs[0].astype(int)).max(2) > 0
    back = cv2.warpAffine(changed.astype(np.uint8), m, (96, 112), flags=cv2.INTER_NEAREST) > 0
    iou = (back & occ).sum() / (back | occ).sum()
    assert iou > 0.85, iou
    # inside the crop's footprint, the photo away from the mask (grown by the blur / shadow margin) is untouched
    def to_src(a):
        return cv2.warpAffine(a.astype(np.uint8), m, (250, 250), flags=cv2.WARP_INVERSE_MAP | cv2.INTER_NEAREST)
    footprint = cv2.erode(to_src(np.ones((112, 96))), np.ones((3, 3), np.uint8)) > 0
    grown = cv2.dilate(to_src(occ), np.ones((15, 15), np.uint8)) > 0
    assert not changed[footprint & ~grown].any()
    assert changed.sum() > 0.05 * changed.size   # the mask is drawn, whole (also below the crop)


@pytest.mark.lfw
def test_dlib_worker_processes_give_the_same_features(lfw):
    """embed_all with 2 spawned worker processes: the same features, in the same order, as one process."""
    from maskface.features import SourceLoader

    ids = ["Aaron_Eckhart/Aaron_Eckhart_0001.jpg", "Abel_Pacheco/Abel_Pacheco_0002.jpg",
           "Zico/Zico_0001.jpg", "Zico/Zico_0002.jpg", "Colin_Powell/Colin_Powell_0001.jpg"]
    load = SourceLoader(lfw / "images_deepfunneled", {i: None for i in ids})   # centred fallback boxes
    emb = make_embedder("dlib-resnet", flip=True, device="cpu")
    one = embed_all(emb, ids, load, "clean", chunk=2)
    two = embed_all(emb, ids, load, "clean", chunk=2, workers=2)
    assert list(two.image_id) == ids and list(two.face) == ["fallback_center"] * len(ids)
    # the workers run torch on one thread, this process on more: the same up to float summation order
    np.testing.assert_allclose(np.stack(one.feature), np.stack(two.feature), atol=1e-5)


AGREE_IDS = ["AJ_Cook/AJ_Cook_0001.jpg", "Ascencion_Barajas/Ascencion_Barajas_0001.jpg",
             "Carly_Fiorina/Carly_Fiorina_0001.jpg", "Dave_Wannstedt/Dave_Wannstedt_0001.jpg",
             "Eric_Dubin/Eric_Dubin_0001.jpg", "Gus_Van_Sant/Gus_Van_Sant_0001.jpg",
             "Janet_Horvath/Janet_Horvath_0001.jpg", "Jon_Corzine/Jon_Corzine_0001.jpg",
             "Latrell_Sprewell/Latrell_Sprewell_0001.jpg", "Martie_Maguire/Martie_Maguire_0001.jpg",
             "Nancy_Greenlaw/Nancy_Greenlaw_0001.jpg", "Phoenix_Chang/Phoenix_Chang_0001.jpg"]


@pytest.mark.lfw
def test_torch_module_and_dlib_agree_through_the_embedders(lfw, tmp_path, device):
    """The same faces through both embedders (chips, flip, batching), the torch network on ``device``: cosine
    >= 0.9999 each against dlib on the CPU; the network saved as a maskface-embedder checkpoint and loaded back
    gives the same descriptors."""
    from maskface.features import SourceLoader, save_dlib_resnet_checkpoint

    root = lfw / "images_deepfunneled"
    ids = AGREE_IDS     # every 400th person's first image, named so that a copy of these files is enough
    load = SourceLoader(root, {i: None for i in ids})
    emb = make_embedder("dlib-resnet", flip=True, batch_size=5, device=device)
    assert emb.describe()["device"] == device and emb.describe()["precision"] == ({} if device == "cpu" else {
        "conv_tf32": False, "matmul_tf32": False})                  # features in true fp32 on a GPU
    a = np.stack(embed_all(emb, ids, load, "clean").feature)
    b = np.stack(embed_all(make_embedder("dlib", flip=True), ids, load, "clean").feature)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.9999, cos
    ckpt = tmp_path / "dlib_resnet.pt"
    save_dlib_resnet_checkpoint(ckpt)
    net, meta = load_checkpoint(ckpt)
    assert meta["input"]["kind"] == "source_chip" and meta["input"]["height"] == 150 and meta["feature_dim"] == 128
    c = np.stack(embed_all(make_embedder("dlib-resnet", flip=True, checkpoint=str(ckpt), device=device), ids, load,
                           "clean").feature)
    np.testing.assert_allclose(c, a, atol=1e-5)


@pytest.mark.lfw
def test_chips_cut_in_workers_for_a_gpu_give_the_same_features(lfw, device):
    """The GPU layout (workers cut the chips, this process runs the network on ``device``): the same features,
    in the same order, as one process doing both."""
    from maskface.features import SourceLoader

    ids = ["Aaron_Eckhart/Aaron_Eckhart_0001.jpg", "Abel_Pacheco/Abel_Pacheco_0002.jpg",
           "Zico/Zico_0001.jpg", "Zico/Zico_0002.jpg", "Colin_Powell/Colin_Powell_0001.jpg"]
    load = SourceLoader(lfw / "images_deepfunneled", {i: None for i in ids})
    emb = make_embedder("dlib-resnet", flip=True, device=device, batch_size=3)
    one = embed_all(emb, ids, load, "clean", chunk=2)
    split = embed_all(emb, ids, load, "clean", chunk=2, workers=2, chips_in_workers=True)
    assert list(split.image_id) == ids and list(split.face) == list(one.face)
    np.testing.assert_allclose(np.stack(one.feature), np.stack(split.feature), atol=1e-5)
    from maskface import features as F

    F._chip_worker_init(emb.cutter_settings(), load)         # what each worker does: the same chips as the embedder
    try:
        chips, faces = F._chip_worker_chunk(ids[:2])
    finally:
        F._WORKER.clear()
    np.testing.assert_array_equal(chips, emb.chips([load(i) for i in ids[:2]]))
    assert faces == ["fallback_center"] * 2
