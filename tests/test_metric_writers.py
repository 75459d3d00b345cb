"""MetricWriter: JSONL scalars (truncation and purge), TensorBoard event files, PNG + npz samples."""

import glob
import io
import json
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from diffusion.images import to_uint8
from diffusion.metric_writers import MetricWriter, read_scalars


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits, add 0xA282EAD8."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(logdir) -> list:
    """Every Event in the TensorBoard files under ``logdir``, checking the TFRecord framing:
    uint64 length, masked CRC of the length, payload, masked CRC of the payload."""
    paths = sorted(glob.glob(os.path.join(logdir, "tensorboard", "events.out.tfevents.*")))
    assert paths, "no event file"
    events = []
    for path in paths:
        with open(path, "rb") as file:
            data = file.read()
        offset = 0
        while offset < len(data):
            header = data[offset : offset + 8]
            (length,) = struct.unpack("<Q", header)
            (length_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
            assert length_crc == masked_crc(header)
            payload = data[offset + 12 : offset + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
            assert payload_crc == masked_crc(payload)
            events.append(event_pb2.Event.FromString(payload))
            offset += 16 + length
    return events


def scalar_events(events) -> dict:
    """{tag: [(step, value), ...]} of the scalar summaries."""
    scalars = {}
    for event in events:
        for value in event.summary.value:
            if value.WhichOneof("value") == "simple_value":
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_crc32c_check_value():
    # The standard check value of CRC-32C (e.g. RFC 3720, iSCSI).
    assert crc32c(b"123456789") == 0xE3069283


def test_scalars_go_to_jsonl_and_tensorboard(tmp_path):
    losses = [0.5, 0.25, 0.125]
    with MetricWriter(tmp_path) as writer:
        for step, loss in enumerate(losses, start=1):
            writer.write_scalars(step, {"loss": jnp.float32(loss), "learning_rate": 1e-4 * step})
    records = read_scalars(tmp_path)
    assert [record["step"] for record in records] == [1, 2, 3]
    assert [record["loss"] for record in records] == losses
    assert [record["learning_rate"] for record in records] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert all(isinstance(record["wall_time"], float) for record in records)
    scalars = scalar_events(read_events(tmp_path))
    assert scalars["loss"] == [(1, 0.5), (2, 0.25), (3, 0.125)]  # exact in float32
    assert [step for step, _ in scalars["learning_rate"]] == [1, 2, 3]
    np.testing.assert_allclose(
        [value for _, value in scalars["learning_rate"]], [1e-4, 2e-4, 3e-4], rtol=1e-6
    )


def test_truncated_last_line_is_skipped_and_dropped(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as writer:
        writer.write_scalars(1, {"loss": 1.0})
        writer.write_scalars(2, {"loss": 2.0})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as file:
        file.write('{"step": 3, "wall_time": 17.5, "lo')  # a kill in the middle of a write
    assert [record["step"] for record in read_scalars(path)] == [1, 2]
    # A new writer drops the partial line before appending, so the file stays valid JSONL.
    with MetricWriter(tmp_path, tensorboard=False) as writer:
        writer.write_scalars(3, {"loss": 3.0})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    # A bad line that is not the last one is corruption, not a cut-short write.
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_scalars(path)


def test_purge_step_drops_the_killed_runs_later_records(tmp_path):
    with MetricWriter(tmp_path) as writer:
        for step in range(1, 6):
            writer.write_scalars(step, {"loss": float(step)})
    # Resumed from a checkpoint at step 2: steps 3.. of the killed run are stale.
    with MetricWriter(tmp_path, purge_step=3) as writer:
        writer.write_scalars(3, {"loss": 30.0})
    records = read_scalars(tmp_path)
    assert [(record["step"], record["loss"]) for record in records] == [
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
    ]
    events = read_events(tmp_path)
    session_starts = [
        event.step
        for event in events
        if event.HasField("session_log") and event.session_log.status == event.session_log.START
    ]
    assert session_starts == [3]


def test_images_go_to_png_npz_and_tensorboard(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (6, 8, 8, 1)).astype(np.float32)
    with MetricWriter(tmp_path) as writer:
        png_path, npz_path = writer.write_images(5, "samples", images)
    assert png_path == os.path.join(tmp_path, "samples", "samples_00000005.png")
    with Image.open(png_path) as picture:
        grid = np.asarray(picture)
    # ceil(sqrt(6)) = 3 columns, 2 rows of 8 x 8 images drawn 64 x 64, with 2-pixel padding.
    assert grid.shape == (2 * (64 + 2) + 2, 3 * (64 + 2) + 2)
    np.testing.assert_array_equal(grid[2:66:8, 2:66:8], to_uint8(images[0])[..., 0])
    np.testing.assert_array_equal(grid[68:132:8, 68:132:8], to_uint8(images[4])[..., 0])
    with np.load(npz_path) as saved:
        np.testing.assert_array_equal(saved["samples"], images)
    encoded = [
        value.image.encoded_image_string
        for event in read_events(tmp_path)
        for value in event.summary.value
        if value.tag == "samples"
    ]
    assert len(encoded) == 1
    with Image.open(io.BytesIO(encoded[0])) as picture:
        tensorboard_grid = np.asarray(picture)
    # TensorBoard stores the grayscale grid as RGB with three equal channels.
    assert tensorboard_grid.shape == (*grid.shape, 3)
    for channel in range(3):
        np.testing.assert_array_equal(tensorboard_grid[..., channel], grid)


def test_points_and_hparams(tmp_path):
    points = np.random.default_rng(1).normal(size=(50, 2)).astype(np.float32)
    hparams = {"learning_rate": 2e-4, "ch_mult": (1, 2, 2), "process": "vp"}
    with MetricWriter(tmp_path) as writer:
        png_path, npz_path = writer.write_points(10, "points", points)
        json_path = writer.write_hparams(hparams)
    with Image.open(png_path) as picture:
        assert picture.size == (400, 400)
    with np.load(npz_path) as saved:
        np.testing.assert_array_equal(saved["samples"], points)
    with open(json_path) as file:
        saved_hparams = json.load(file)
    assert saved_hparams == {"learning_rate": 2e-4, "ch_mult": [1, 2, 2], "process": "vp"}
    texts = [
        value.tensor.string_val[0].decode()
        for event in read_events(tmp_path)
        for value in event.summary.value
        if value.tag.startswith("hparams")
    ]
    assert len(texts) == 1
    assert json.loads(texts[0].replace("\n    ", "\n")) == saved_hparams


def test_bad_scalars_raise(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="reserved"):
            writer.write_scalars(1, {"step": 3.0})
        with pytest.raises(ValueError, match="one element"):
            writer.write_scalars(1, {"loss": np.ones(3)})


def test_nonfinite_values_keep_the_file_strict_json(tmp_path):
    """NaN and infinities become null and are named under "nonfinite"; TensorBoard gets them."""
    with MetricWriter(tmp_path) as writer:
        writer.write_scalars(3, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.5})
        writer.write_scalars(4, {"loss": 1.25})
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as file:
        lines = file.read().splitlines()

    def refuse(constant):
        raise ValueError(constant)

    first, second = (json.loads(line, parse_constant=refuse) for line in lines)
    assert first["loss"] is None and first["grad_norm"] is None and first["lr"] == 0.5
    assert first["nonfinite"] == ["grad_norm", "loss"]
    assert second["loss"] == 1.25 and "nonfinite" not in second
    events = scalar_events(read_events(tmp_path))
    assert math.isnan(events["loss"][0][1]) and events["loss"][1] == (4, 1.25)
