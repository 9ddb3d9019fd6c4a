"""diffsynth.fantasy_world.data.camera_files: RealEstate10K camera files, exact round trip, a clear error per bad line."""
import pytest
import torch

from diffsynth.fantasy_world.data.camera_files import read_camera_file, write_camera_file

from conftest import random_cameras


def test_camera_file_round_trip_is_exact(tmp_path):
    w2c, intrinsics = random_cameras(7)
    path = tmp_path / "cams.txt"
    write_camera_file(path, w2c, intrinsics, url="https://www.youtube.com/watch?v=abc")
    assert path.read_text().startswith("https://")
    read_w2c, read_intrinsics = read_camera_file(path)
    assert read_w2c.dtype == torch.float32 and read_w2c.shape == (7, 3, 4)
    assert torch.equal(read_w2c, w2c)
    assert torch.equal(read_intrinsics, intrinsics)


def test_camera_file_accepts_tabs_multiple_spaces_and_blank_lines(tmp_path):
    w2c, intrinsics = random_cameras(2)
    path = tmp_path / "cams.txt"
    write_camera_file(path, w2c, intrinsics, timestamps=[33366667, 66733333])
    lines = path.read_text().splitlines()
    messy = ["http://example.com/video", ""] + ["\t" + line.replace(" ", " \t  ") + "  " for line in lines]
    path.write_text("\n".join(messy[:3] + [""] + messy[3:]) + "\n\n")
    read_w2c, read_intrinsics = read_camera_file(path)
    assert torch.equal(read_w2c, w2c)
    assert torch.equal(read_intrinsics, intrinsics)


def test_camera_file_translation_is_at_flat_indices_3_7_11(tmp_path):
    # A rotation with nine distinct entries (the quaternion (1, 2, 3, 5) / sqrt(39), times 39) and t_i = 100 * i.
    rotation = [[13, -26, 26], [34, 19, 2], [-14, 22, 29]]
    matrix = " ".join(" ".join("%.9g" % (r / 39) for r in row) + f" {100 * (i + 1)}" for i, row in enumerate(rotation))
    path = tmp_path / "cams.txt"
    path.write_text(f"0 0.5 0.6 0.45 0.55 0 0 {matrix}\n")
    w2c, intrinsics = read_camera_file(path)
    assert w2c[0, :, 3].tolist() == [100.0, 200.0, 300.0]
    assert torch.allclose(w2c[0, :, :3], torch.tensor(rotation, dtype=torch.float32) / 39, atol=1e-7)
    assert intrinsics[0].tolist() == pytest.approx([0.5, 0.6, 0.45, 0.55])


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ("0 0.5 0.5 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1", "expected 19"),
        ("0 0.5 0.5 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 zero", "non-numeric"),
        ("0 0.5 0.5 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 nan", "non-finite"),
        ("0 0.5 inf 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 0", "non-finite"),
        ("0 0.5 0.5 0.5 0.5 0 0 1 0 0 1e39 0 1 0 0 0 0 1 0", "value out of float32 range"),
        ("0 0 0 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 0", "focal lengths must be > 0, got fx=0, fy=0"),
        ("0 0.5 -0.5 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 0", "focal lengths must be > 0"),
        ("0 0.5 0.5 1.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 0", r"principal point \(cx=1.5, cy=0.5\) outside the image"),
        ("0 0.5 0.5 0.5 -0.1 0 0 1 0 0 0 0 1 0 0 0 0 1 0", "principal point"),
        ("0 0.5 0.5 0.5 0.5 0 0 3 0 0 0 0 3 0 0 0 0 3 0", r"the 3x3 block is not a rotation: max \|R R\^T - I\| = 8"),
        ("0 0.5 0.5 0.5 0.5 0 0 0 0 0 0 0 0 0 0 0 0 0 0", "the 3x3 block is not a rotation"),
        ("0 0.5 0.5 0.5 0.5 0 0 1 0.01 0 0 0 1 0 0 0 0 1 0", "the 3x3 block is not a rotation"),  # sheared
        ("0 0.5 0.5 0.5 0.5 0 0 -1 0 0 0 0 1 0 0 0 0 1 0", "the 3x3 block has determinant -1: a reflection"),
    ],
)
def test_camera_file_bad_line_names_file_and_line(tmp_path, bad_line, reason):
    good = "0 0.5 0.5 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 0"
    path = tmp_path / "broken.txt"
    path.write_text(f"https://x\n{good}\n\n{bad_line}\n")
    with pytest.raises(ValueError, match=rf"broken\.txt, line 4: {reason}"):
        read_camera_file(path)


def test_camera_file_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_camera_file(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("https://only-a-url\n\n")
    with pytest.raises(ValueError, match="empty.txt"):
        read_camera_file(empty)


def test_camera_file_accepts_rotations_rounded_to_four_decimals(tmp_path):
    w2c, intrinsics = random_cameras(3, seed=4)
    path = tmp_path / "cams.txt"
    path.write_text("".join(
        f"{t} " + " ".join(f"{v:.4f}" for v in intrinsics[t].tolist()) + " 0 0 " + " ".join(f"{v:.4f}" for v in w2c[t].reshape(-1).tolist()) + "\n"
        for t in range(3)
    ))
    read_w2c, _ = read_camera_file(path)
    assert torch.allclose(read_w2c, w2c, atol=1e-4)
