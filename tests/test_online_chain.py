"""The whole online step on a tiny segmentor on the CPU: teacher targets -> ClassMix ->
strong augmentation -> weighted CE (+ masked consistency and feature distance) -> backward
-> optimiser step -> teacher update."""

from __future__ import annotations

import torch

from dast.models.build import build_segmentor
from dast.training.online import (
    StrongAugment,
    Teacher,
    block_mask,
    classmix_masks,
    feature_distance_loss,
    frozen_copy,
    mask_images,
    mix,
    mixed_weight,
    scaled_block,
    strong_augment,
    teacher_targets,
    weighted_cross_entropy,
)

NUM_CLASSES = 5
SIZE = (32, 48)  # height, width


def test_one_online_step_trains_the_student_and_moves_the_teacher():
    torch.manual_seed(0)
    student = build_segmentor("small", NUM_CLASSES)
    teacher = Teacher(student, alpha=0.999)
    initial_encoder = frozen_copy(student.encoder)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)

    src = torch.rand(2, 3, *SIZE, generator=g)
    src_label = torch.randint(0, NUM_CLASSES, (2, *SIZE), generator=g)
    src_label[:, :4] = 255
    tgt = torch.rand(2, 3, *SIZE, generator=g)

    # the teacher labels the un-augmented target images
    pseudo, weight = teacher_targets(teacher.predict(tgt), threshold=0.2, ignore_top=2, size=SIZE)
    assert pseudo.shape == (2, *SIZE) and weight.shape == (2, *SIZE)
    assert weight[:, :2].abs().sum() == 0 and weight[:, 2:].min() > 0

    mask = classmix_masks(src_label, g, NUM_CLASSES)
    image = strong_augment(mix(mask, src, tgt), "unit", g, StrongAugment(jitter_prob=1.0, blur_prob=1.0))
    label = mix(mask, src_label, pseudo)
    pixel_weight = mixed_weight(mask, weight)
    assert torch.equal(label[mask], src_label[mask]) and torch.equal(label[~mask], pseudo[~mask])
    assert (pixel_weight[mask] == 1).all()

    opt.zero_grad()
    features = student.extract(src)
    source_loss = weighted_cross_entropy(student.predict(features), src_label, torch.ones(2, *SIZE))
    with torch.no_grad():
        frozen_features = initial_encoder(src)
    fd = feature_distance_loss(features, frozen_features, src_label, classes=(1, 3), num_classes=NUM_CLASSES)
    mix_loss = weighted_cross_entropy(student(image), label, pixel_weight)
    blocks = block_mask(2, *SIZE, ratio=0.7, block=scaled_block(64, SIZE), generator=g)
    masked_loss = weighted_cross_entropy(student(mask_images(tgt, blocks)), pseudo, weight)
    loss = source_loss + fd + mix_loss + masked_loss
    assert torch.isfinite(loss) and mix_loss > 0 and masked_loss > 0
    assert fd.item() == 0.0  # the student still equals the initial encoder
    loss.backward()

    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads if gr is not None) > 0
    assert all(p.grad is None for p in teacher.module.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt.step()

    # iteration 1: the teacher becomes the mean of its start and the stepped student
    assert teacher.update(student, step=1) == 0.5
    after = teacher.state_dict()
    for name, p in student.named_parameters():
        assert torch.allclose(after[name], 0.5 * before[name] + 0.5 * p.detach(), atol=1e-6), name
    changed = [n for n, p in student.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed  # the student moved, so the teacher did too
    assert any(not torch.equal(after[n], before[n]) for n in changed)


def test_the_device_side_blocks_read_nothing_back(monkeypatch):
    """Pseudo labels, ClassMix, mixing, the losses and the block mask never ask a tensor for
    a host value (``item``, ``tolist``, ``bool``, ``float``, ``int``), so on a GPU they queue
    kernels without waiting for them."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, NUM_CLASSES, 8, 12, generator=g)
    src_label = torch.randint(0, NUM_CLASSES, (2, *SIZE), generator=g)
    feats = torch.randn(2, 4, 4, 6, generator=g, requires_grad=True)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("a host read-back")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    pseudo, weight = teacher_targets(logits, ignore_top=1, ignore_bottom=2, size=SIZE)
    mask = classmix_masks(src_label, g, NUM_CLASSES)
    label = mix(mask, src_label, pseudo)
    loss = weighted_cross_entropy(logits, label, mixed_weight(mask, weight))
    loss = loss + feature_distance_loss(feats, torch.zeros_like(feats), src_label, classes=(1, 2), num_classes=5)
    blocks = block_mask(2, *SIZE, ratio=0.7, block=8, generator=g)
    mask_images(torch.zeros(2, 3, *SIZE), blocks)
    loss.backward()
