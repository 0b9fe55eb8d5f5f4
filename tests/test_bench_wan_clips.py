"""bench.train_comfy_wan's pure helpers (no ComfyUI): the moving-shape clips, the latent map, the
noise-level shift, and the frame picture."""
import numpy as np
import torch

from bench import train_comfy_wan as wan


def test_clips_are_seeded_in_range_and_move():
    a, la = wan.draw_clips(np.random.default_rng([0, 3]), 8)
    b, lb = wan.draw_clips(np.random.default_rng([0, 3]), 8)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert a.shape == (8, 3, wan.FRAMES, wan.LATENT_SIZE, wan.LATENT_SIZE)
    assert a.min() >= -1 and a.max() <= 1
    # the shape moves: the first and last frames differ somewhere by more than the colour jitter
    moved = (a[:, :, 0] - a[:, :, -1]).abs().flatten(1).amax(1)
    assert (moved > 0.2).all()
    c, _ = wan.draw_clips(np.random.default_rng([1, 3]), 8)
    assert not torch.equal(a, c)


def test_clips_take_given_classes_and_colours_follow_the_class():
    labels = np.array([0, 1, 2, 3] * 4)  # circle in red, green, blue, yellow, then the other shapes
    rgb, got = wan.draw_clips(np.random.default_rng(5), len(labels), labels=labels)
    assert got.tolist() == labels.tolist()
    pixels = ((rgb + 1) / 2).permute(0, 2, 3, 4, 1).reshape(len(labels), -1, 3)
    for clip, label in zip(pixels, labels):
        fg = clip[clip.amax(1) - clip.amin(1) > 0.4]  # saturated pixels: the shape (backgrounds are dull)
        colour = wan.COLOURS[label % len(wan.COLOURS)]
        nearest = min(wan.RGB, key=lambda c: (fg.mean(0) - torch.tensor(wan.RGB[c])).norm().item())
        assert nearest == colour, (label, fg.mean(0))


def test_latent_map_round_trip():
    prompts = wan.make_prompts()
    assert prompts["context"].shape == (wan.NUM_CLASSES + 1, wan.TXT_TOKENS, wan.CONFIG["text_dim"])
    rgb, _ = wan.draw_clips(np.random.default_rng(1), 4)
    z = wan.rgb_to_latent(rgb, prompts)
    assert z.shape == (4, 16, wan.FRAMES, wan.LATENT_SIZE, wan.LATENT_SIZE)
    assert torch.allclose(wan.latent_to_rgb(z, prompts), rgb, atol=1e-5)
    assert torch.equal(wan.make_prompts()["context"], prompts["context"])  # seeded


def test_shift_sigma_is_comfyuis_time_snr_shift():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0])
    expected = torch.tensor([0.0, 2.0 / 2.75, 4.0 / 4.5, 1.0])  # 8u / (1 + 7u)
    assert torch.allclose(wan.shift_sigma(u), expected)
    assert torch.allclose(wan.shift_sigma(u, 1.0), u)


def test_clip_rows_put_each_frame_in_a_row():
    rgb = torch.zeros(3, 3, wan.FRAMES, 4, 4)
    rgb[1, 0, -1] = 1.0  # clip 1, last frame red
    rows = wan.clip_rows(rgb)
    assert [name for name, _ in rows] == [f"frame {f}" for f in range(wan.FRAMES)]
    assert all(len(images) == 3 and images[0].shape == (4, 4, 3) for _, images in rows)
    assert rows[-1][1][1][0, 0].tolist() == [255, 128, 128] and rows[0][1][1][0, 0].tolist() == [128, 128, 128]
