"""diffsynth.fantasy_world.data.synthetic_ood: the second scene family (yards and halls) for the OOD-content split."""
import numpy as np
import pandas
import pytest

from diffsynth.fantasy_world.geometry.camera import intrinsics_to_matrix
from diffsynth.fantasy_world.data.camera_files import read_camera_file
from diffsynth.fantasy_world.data.synthetic import Scene, render_frame, sample_clip
from diffsynth.fantasy_world.data.synthetic_ood import (
    CAMERA_REGION,
    OOD_FAMILY,
    Cylinder,
    PatternTexture,
    indoor_scene,
    main,
    outdoor_scene,
)

GREY = PatternTexture("noise", 1.0, np.array([[0.2, 0.2, 0.2], [0.8, 0.8, 0.8]]))


def test_cylinder_depth_is_exact_on_side_and_cap():
    """Looking along z at a vertical cylinder of radius 1 centred 5 ahead: the nearest side point is
    at z = 4 on the optical axis; looking down onto it from above, the cap is hit at its height."""
    cylinder = Cylinder(np.array([0.0, -2.0, 5.0]), 1.0, 4.0, GREY)
    K = np.array([[20.0, 0.0, 8.0], [0.0, 20.0, 8.0], [0.0, 0.0, 1.0]])
    _, depth, points = render_frame(Scene([cylinder], "c"), np.eye(3, 4), K, 16, 16)
    centre_x = np.abs(points[..., 0]).min()
    assert 4.0 <= depth[depth > 0].min() < 4.01 and centre_x < 0.03
    # A camera 3 above the cap (world y = 5) looking straight down: camera z = world -y.
    down = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, -5.0], [0.0, -1.0, 0.0, 5.0]])
    _, depth, points = render_frame(Scene([cylinder], "c"), down, K, 16, 16)
    np.testing.assert_allclose(depth[7:9, 7:9], 3.0, rtol=1e-12)
    np.testing.assert_allclose(points[7:9, 7:9, 1], 2.0, rtol=1e-12)


@pytest.mark.parametrize("kind", ["noise", "rings", "diagonal"])
def test_pattern_textures_vary_and_stay_between_their_colours(kind):
    texture = PatternTexture(kind, 0.5, np.array([[0.1, 0.2, 0.3], [0.9, 0.8, 0.7]]), salt=3)
    albedo = texture(np.random.default_rng(0).uniform(-3, 3, size=(500, 2)))
    assert albedo.std(axis=0).min() > 0.05
    assert albedo.min() >= 0.1 - 1e-12 and albedo.max() <= 0.9 + 1e-12
    with pytest.raises(ValueError, match="pattern"):
        PatternTexture("checker", 1.0, texture.colours)(np.zeros((1, 2)))


@pytest.mark.parametrize("make_scene", [outdoor_scene, indoor_scene])
def test_cameras_in_the_region_never_start_inside_or_touching_an_object(make_scene):
    """From every camera position of the region, the nearest surface is further than a margin."""
    for index in range(5):
        rng = np.random.default_rng((5, index))
        scene = make_scene(rng)
        for eye in [np.array([r * np.cos(a), h, r * np.sin(a)]) for r in (0.0, CAMERA_REGION.radius_range[1])
                    for a in np.linspace(0, 2 * np.pi, 6) for h in CAMERA_REGION.height_range]:
            # Six axis-aligned 90-degree views cover every direction.
            for rotation in (np.eye(3), np.array([[0, 0, -1], [0, 1, 0], [1, 0, 0.0]]), np.diag([-1, 1, -1.0]),
                             np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0.0]])):
                w2c = np.concatenate([rotation, -(rotation @ eye)[:, None]], axis=1)
                K = np.array([[4.0, 0.0, 4.0], [0.0, 4.0, 4.0], [0.0, 0.0, 1.0]])
                _, depth, _ = render_frame(Scene([p for p in scene.primitives if not _is_enclosure(p)], ""), w2c, K, 8, 8)
                assert depth[depth > 0].min(initial=np.inf) > 0.25


def _is_enclosure(primitive) -> bool:
    """Ground, floor, ceiling and walls: large quads the camera is meant to be near."""
    return hasattr(primitive, "half_u")


def test_both_indoor_and_outdoor_scenes_render_with_valid_labels(tmp_path):
    main(["--out", str(tmp_path), "--num-scenes", "6", "--frames", "5", "--height", "16", "--width", "24", "--seed", "1"])
    metadata = pandas.read_csv(tmp_path / "metadata.csv")
    assert {prompt.split()[1] for prompt in metadata["prompt"]} == {"outdoor", "indoor"}
    for _, row in metadata.iterrows():
        w2c, intrinsics = read_camera_file(tmp_path / row["camera"])
        depth = np.load(tmp_path / row["depth"]).astype(np.float64)
        points = np.load(tmp_path / row["points"]).astype(np.float64)
        K = intrinsics_to_matrix(intrinsics.double(), 16, 24).numpy()
        valid = depth > 0
        assert valid.mean() > 0.3
        w2c = w2c.double().numpy()
        camera_points = np.einsum("tij,thwj->thwi", w2c[:, :, :3], points) + w2c[:, None, None, :, 3]
        assert np.abs(camera_points[..., 2] - depth)[valid].max() < 1e-3
        u = K[:, None, None, 0, 0] * camera_points[..., 0] / camera_points[..., 2] + K[:, None, None, 0, 2]
        assert np.abs(u - (np.arange(24) + 0.5))[valid].max() < 1e-2


def test_the_family_only_offers_decorrelated_paths():
    with pytest.raises(ValueError, match="orbit"):
        sample_clip(np.random.default_rng(0), OOD_FAMILY, "orbit", 3, 8, 8)
    with pytest.raises(SystemExit):
        main(["--out", "unused", "--trajectory", "orbit"])
