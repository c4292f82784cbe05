import torch

from data_aug.views import TwoViews, ViewSettings, blur_kernel_size, create_eval_transform, create_view_transform


def _images(n=4, size=40):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g), i) for i in range(n)]


def test_views_shape_range_and_difference():
    views = TwoViews(_images(), create_view_transform(ViewSettings(24)), seed=0)
    v1, v2 = views[0]
    assert v1.shape == v2.shape == (3, 24, 24) and v1.dtype == torch.float32
    assert 0 <= v1.min() and v1.max() <= 1
    assert not torch.equal(v1, v2)


def test_views_are_reproducible_per_seed_epoch_index():
    data = _images()
    a = TwoViews(data, create_view_transform(ViewSettings(24)), seed=3)
    b = TwoViews(data, create_view_transform(ViewSettings(24)), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    b.set_epoch(1)
    assert not torch.equal(a[2][0], b[2][0])
    c = TwoViews(data, create_view_transform(ViewSettings(24)), seed=4)
    assert not torch.equal(a[2][0], c[2][0])


def test_views_do_not_touch_global_rng():
    state = torch.get_rng_state()
    TwoViews(_images(), create_view_transform(ViewSettings(24)), seed=0)[0]
    assert torch.equal(state, torch.get_rng_state())


def test_workers_do_not_replay_each_other():
    """With two workers, all images in a batch still get distinct random crops."""
    same = [(torch.full((3, 32, 32), 0, dtype=torch.uint8).index_fill_(2, torch.arange(16), 255), 0)] * 8
    pairs = TwoViews(same, create_view_transform(ViewSettings(16)), seed=0)
    loader = torch.utils.data.DataLoader(pairs, batch_size=4, num_workers=2)
    firsts = torch.cat([v1 for v1, _ in loader])
    assert len({tuple(x.flatten().tolist()) for x in firsts}) == len(firsts)


def test_blur_kernel_about_ten_percent():
    assert blur_kernel_size(96) == 11 and blur_kernel_size(224) == 23 and blur_kernel_size(32) == 3


def test_colour_jitter_strength_is_used():
    t = create_view_transform(ViewSettings(24, s=0.5))
    jitter = [m for m in t.transforms if type(m).__name__ == "RandomApply"][0].transforms[0]
    assert jitter.brightness == (0.6, 1.4) and jitter.hue == (-0.1, 0.1)


def test_eval_transform_is_deterministic():
    image = _images(1, 50)[0][0]
    t = create_eval_transform(32)
    assert torch.equal(t(image), t(image)) and t(image).shape == (3, 32, 32)
