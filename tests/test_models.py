"""Towers: shapes against the conv formula, build-time errors, and weight sharing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from siamese.distances import EuclideanDistance
from siamese.errors import ConfigError
from siamese.losses import ContrastiveLoss
from siamese.models import ConvTower, ResNet18Tower, conv_output_size


def formula(h: int, k: int, s: int = 1, p: int = 0, d: int = 1) -> int:
    return (h + 2 * p - d * (k - 1) - 1) // s + 1


@pytest.mark.parametrize(
    ("h", "k", "s", "p", "d"),
    [(28, 3, 1, 1, 1), (28, 5, 2, 0, 1), (105, 10, 1, 0, 1), (31, 3, 2, 1, 2), (7, 7, 1, 0, 1)],
)
def test_conv_output_size_matches_formula_and_torch(h, k, s, p, d):
    assert conv_output_size(h, k, s, p, d) == formula(h, k, s, p, d)
    out = nn.Conv2d(1, 1, k, s, p, d)(torch.zeros(1, 1, h, h))
    assert out.shape[-1] == formula(h, k, s, p, d)


LAYERS = [
    {"type": "conv", "out_channels": 8, "kernel_size": 5, "stride": 2, "padding": 1},
    {"type": "batchnorm"},
    {"type": "relu"},
    {"type": "maxpool", "kernel_size": 3, "stride": 2},
    {"type": "conv", "out_channels": 16, "kernel_size": 3, "dilation": 2, "padding": 2},
    {"type": "avgpool", "kernel_size": 2},
]


@pytest.mark.parametrize(("c", "h", "w"), [(1, 28, 28), (3, 64, 48), (1, 105, 105), (3, 33, 17)])
def test_conv_tower_flattened_size_follows_the_formula(c, h, w):
    tower = ConvTower(LAYERS, hidden_dims=[32], embedding_dim=10, in_channels=c, image_size=[h, w])
    # By hand: conv(5, s2, p1) -> maxpool(3, s2) -> conv(3, d2, p2) keeps size -> avgpool(2).
    eh, ew = (formula(formula(formula(x, 5, 2, 1), 3, 2), 2, 2) for x in (h, w))
    assert tower.feature_shape == (16, eh, ew)
    assert tower.head[1].in_features == 16 * eh * ew
    assert tower(torch.rand(4, c, h, w)).shape == (4, 10)


def test_layer_list_that_shrinks_below_one_pixel_fails_naming_the_layer():
    layers = [{"type": "conv", "out_channels": 4, "kernel_size": 3}] + [
        {"type": "maxpool", "kernel_size": 2}
    ] * 5
    # 28 -conv3-> 26 -pool-> 13 -> 6 -> 3 -> 1 -> 0: the fifth pool (layer 5) fails.
    with pytest.raises(
        ConfigError, match=r"model.layers\[5\] \(maxpool.*shrinks the 1x1 input to 0x0"
    ):
        ConvTower(layers, embedding_dim=8, in_channels=1, image_size=28)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"type": "convolution"}, "type 'convolution'"),
        ({"type": "conv", "out_channels": 4, "kernal_size": 3}, "unknown keys \\['kernal_size'\\]"),
        ({"type": "conv"}, "needs out_channels"),
    ],
)
def test_bad_layer_specs_fail_with_a_clear_message(spec, match):
    with pytest.raises(ConfigError, match=match):
        ConvTower([spec], embedding_dim=8, in_channels=1, image_size=28)


@pytest.mark.parametrize("dim", [0, -3])
def test_embedding_dim_must_be_positive(dim):
    with pytest.raises(
        ConfigError, match=f"model.embedding_dim must be a positive integer, got {dim}"
    ):
        ConvTower(LAYERS, embedding_dim=dim, in_channels=1, image_size=28)


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_resnet18_tower_any_channels_no_download(channels):
    tower = ResNet18Tower(embedding_dim=12, in_channels=channels, image_size=[28, 28])
    assert tower(torch.rand(2, channels, 28, 28)).shape == (2, 12)
    big = ResNet18Tower(embedding_dim=5, small_input=False, in_channels=channels, image_size=64)
    assert big(torch.rand(2, channels, 64, 64)).shape == (2, 5)


def test_resnet18_dropout_acts_in_training_only():
    torch.manual_seed(0)
    tower = ResNet18Tower(embedding_dim=8, dropout=0.5, in_channels=1, image_size=28)
    x = torch.rand(2, 1, 28, 28)
    tower.train()
    assert not torch.equal(tower(x), tower(x))  # a new dropout mask each call
    tower.eval()
    assert torch.equal(tower(x), tower(x))
    assert isinstance(tower.net.fc[0], torch.nn.Dropout) and tower.net.fc[0].p == 0.5
    assert isinstance(
        ResNet18Tower(embedding_dim=8, in_channels=1, image_size=28).net.fc, torch.nn.Linear
    )
    with pytest.raises(ConfigError, match=r"model.dropout must be in \[0, 1\), got 1.0"):
        ResNet18Tower(embedding_dim=8, dropout=1.0, in_channels=1, image_size=28)


def test_input_normalisation_is_applied_and_saved():
    tower = ConvTower(
        LAYERS, embedding_dim=4, in_channels=1, image_size=28, input_mean=0.5, input_std=0.25
    )
    x = torch.full((1, 1, 28, 28), 0.75)
    assert torch.allclose(tower.normalize_input(x), torch.ones_like(x))
    assert {"input_mean", "input_std"} <= set(tower.state_dict())


def test_weight_sharing_gradient_is_the_sum_of_both_branches():
    """One tower embeds both sides; its gradient equals branch 1's plus branch 2's."""
    torch.manual_seed(0)
    tower = ConvTower(
        [*LAYERS[:1], {"type": "relu"}], embedding_dim=6, in_channels=1, image_size=12
    )
    tower.eval()  # no batch-norm here anyway; keep the two passes comparable
    loss = ContrastiveLoss(EuclideanDistance(), margin=1.0)
    x1, x2 = torch.rand(5, 1, 12, 12), torch.rand(5, 1, 12, 12)
    same = torch.tensor([True, False, True, False, False])

    # Shared forward over the concatenated batch, as the module does.
    emb = tower(torch.cat([x1, x2]))
    loss.forward_pairs(*emb.split(5), same).loss.backward()
    shared = [p.grad.clone() for p in tower.parameters()]
    assert len(shared) == len(list(tower.parameters()))  # one parameter set

    # Branch 1 alone (branch 2 detached), then branch 2 alone: their sum is the shared grad.
    branch = []
    for side in (0, 1):
        tower.zero_grad()
        e1, e2 = tower(x1), tower(x2)
        e1, e2 = (e1, e2.detach()) if side == 0 else (e1.detach(), e2)
        loss.forward_pairs(e1, e2, same).loss.backward()
        branch.append([p.grad.clone() for p in tower.parameters()])
    for g, g1, g2 in zip(shared, *branch, strict=True):
        assert torch.allclose(g, g1 + g2, atol=1e-6)
        assert g1.abs().sum() > 0 and g2.abs().sum() > 0


def test_the_module_scores_with_its_own_distance_through_the_evaluator():
    import numpy as np

    from siamese.module import SiameseModule

    torch.manual_seed(0)
    tower = {
        "_target_": "siamese.models.ConvTower",
        "layers": [],
        "embedding_dim": 4,
        "in_channels": 1,
        "image_size": [2, 2],
    }
    module = SiameseModule(
        tower=tower,
        distance={"_target_": "siamese.distances.CosineSimilarity"},
        loss={"_target_": "siamese.losses.ContrastiveLoss"},
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
        eval_pairs=40,
        eval_seed=7,
    )
    a = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]], dtype=np.float32)
    b = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0]], dtype=np.float32)
    # Cosine distance 1 - cos: 1 - 1/sqrt(2), and 2 for opposite directions.
    np.testing.assert_allclose(module.pair_distance(a, b), [1 - 2**-0.5, 2.0], rtol=1e-6)
    evaluator = module.evaluator(oneshot=True)
    assert evaluator.metric == "ip" and evaluator.pair_distance == module.pair_distance
    assert (evaluator.pairs, evaluator.pairs_seed, evaluator.oneshot_seed) == (40, 7, 7)
    assert evaluator.oneshot_ways == (5, 20) and module.evaluator().oneshot_ways == ()
    assert module.evaluator(pairs=10).pairs == 10
    # Validation: the steps' embeddings scored by that evaluator; the report is kept.
    emb = torch.nn.functional.normalize(torch.randn(30, 4), dim=1)
    labels = torch.arange(30) % 3
    module._outputs.append((emb, labels, torch.arange(30)))
    logged = module._epoch_metrics("val")
    report = module.last_eval.report
    assert logged == report.logged() and "oneshot_5way_1shot" not in logged
    want = module.evaluator().evaluate(emb.numpy(), labels.numpy())
    assert report.metrics == want.metrics
    assert module.last_eval.stage == "val" and torch.equal(module.last_eval.embeddings, emb)


def test_training_steps_log_where_lightning_writes_logs():
    """log_every_n_steps=2: the steps after 1, 3, 5 optimizer steps, and a stopping run's."""
    from types import SimpleNamespace

    from siamese.module import SiameseModule

    module = SiameseModule(
        tower={
            "_target_": "siamese.models.ConvTower",
            "layers": [],
            "embedding_dim": 2,
            "in_channels": 1,
            "image_size": [2, 2],
        },
        distance={"_target_": "siamese.distances.EuclideanDistance"},
        loss={"_target_": "siamese.losses.ContrastiveLoss"},
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
    )
    trainer = SimpleNamespace(fast_dev_run=False, log_every_n_steps=2, should_stop=False)
    module._trainer = trainer
    logged = []
    for step in range(6):
        trainer.global_step = step
        logged.append(module._logs_this_step())
    assert logged == [False, True, False, True, False, True]
    trainer.should_stop = True
    assert module._logs_this_step()
    trainer.log_every_n_steps = 0  # logging off
    assert not module._logs_this_step()
