"""M2IR: the registry, any input size, the identity at initialisation, gradients, external
context, and m2ir-tiny overfitting one degraded/clean pair."""
from __future__ import annotations

import pytest
import torch

from moe_restore.data import builtin_images, degrade
from moe_restore.data.degradations import NOISE_STRENGTH
from moe_restore.models import M2IR, build, config, names
from moe_restore.losses import charbonnier
from moe_restore.train.metrics import psnr


def _tiny(**overrides) -> M2IR:
    torch.manual_seed(0)
    return build("m2ir-tiny", backend="torch", **overrides)


def _wake_output(model: M2IR) -> M2IR:
    """Give the zero-initialised output conv random weights so that every path shows."""
    with torch.no_grad():
        model.output.weight.normal_(0, 0.05)
    return model


def test_registry():
    assert {"m2ir-base", "m2ir-small", "m2ir-tiny"} <= set(names())
    base = config("m2ir-base")
    assert (base.dim, base.blocks, base.refinement, base.num_experts, base.top_k, base.d_state) == (
        48, (4, 6, 6, 8), 4, 6, 2, 16)
    assert config("m2ir-tiny", blocks=[2, 1, 1, 1]).blocks == (2, 1, 1, 1)
    with pytest.raises(TypeError, match="bogus"):
        build("m2ir-tiny", bogus=1)
    with pytest.raises(ValueError, match="unknown model"):
        build("m2ir-huge")


@pytest.mark.parametrize("shape", [(1, 3, 67, 53), (2, 3, 5, 9), (1, 3, 16, 24)])
def test_any_size_returns_the_input_shape_and_starts_as_identity(shape):
    model = _tiny()
    image = torch.rand(shape)
    out = model(image)
    assert out.shape == image.shape
    assert torch.equal(out, image), "the zero-initialised output conv must make M2IR the identity"
    assert model.class_logits.shape == (shape[0], model.config.num_classes)
    assert model.aux_loss.dim() == 0 and torch.isfinite(model.aux_loss)


def test_gradients_reach_every_parameter():
    model = _wake_output(_tiny())
    image = torch.rand(2, 3, 19, 21)
    out = model(image)
    (charbonnier(out, torch.rand_like(out)) + model.aux_loss + model.class_logits.square().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing}"
    dead = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not dead, f"zero gradient for {dead}"


def _single_head_copy(model: M2IR, head: int) -> M2IR:
    """A single-head M2IR holding ``model``'s weights and its output head ``head``."""
    single = build("m2ir-tiny", backend="torch", degradation_heads=False)
    state = model.state_dict()
    for name in ("output.weight", "output.bias", "input_filter.weight"):
        state[name] = state[name].unflatten(0, (model.output_heads, 3))[head]
    single.load_state_dict(state)
    return single


def test_output_head_is_the_label_in_training_and_the_predicted_class_otherwise():
    """out = x + conv_t(features) + F_t * x with t the image's label when given, else the argmax
    of the class logits: the single-head model holding head t gives the same output."""
    model = _wake_output(_tiny())
    assert model.config.degradation_heads and model.output_heads == model.config.num_classes == 5
    with torch.no_grad():
        model.input_filter.weight.normal_(0, 0.05)
        model.degradation_encoder.classifier.weight.zero_()
        model.degradation_encoder.classifier.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]))
    image = torch.rand(2, 3, 24, 20)
    predicted = model(image)
    torch.testing.assert_close(predicted, _single_head_copy(model, 3)(image))
    labelled = model(image, labels=torch.tensor([1, 4]))
    for index, head in enumerate((1, 4)):
        torch.testing.assert_close(labelled[index], _single_head_copy(model, head)(image[index:index + 1])[0],
                                   rtol=1e-5, atol=1e-6)
    for bad in (torch.tensor([0, 5]), torch.tensor([0]), torch.tensor([0.0, 1.0])):
        with pytest.raises(ValueError, match="labels"):
            model(image, labels=bad)


def test_input_filter_is_odd_and_replicate_padded():
    with pytest.raises(ValueError, match="input_filter"):
        _tiny(input_filter=4)
    model = _tiny(degradation_heads=False, input_filter=3)
    shift = torch.zeros(3, 3, 3, 3)
    for channel in range(3):
        shift[channel, channel, 1, 2] = 1.0  # out[i, j] = x[i, j + 1]
    with torch.no_grad():
        model.input_filter.weight.copy_(shift)
    image = torch.rand(1, 3, 16, 16)
    right_neighbour = torch.cat([image[..., 1:], image[..., -1:]], dim=-1)
    torch.testing.assert_close(model(image), image + right_neighbour)


def test_external_context_replaces_the_encoder():
    model = _wake_output(_tiny(context_dim=12))
    image = torch.rand(2, 3, 16, 16)
    a = model(image, context=torch.zeros(2, 12))
    torch.testing.assert_close(model.class_logits, model.degradation_encoder.classifier(torch.zeros(2, 12)))
    b = model(image, context=torch.randn(2, 12) * 5)
    assert a.shape == image.shape and not torch.equal(a, b), "the context must steer the experts"
    with pytest.raises(ValueError, match="context"):
        model(image, context=torch.zeros(2, 11))
    with pytest.raises(ValueError, match="image"):
        model(torch.rand(3, 16, 16))


def test_tiny_overfits_one_degraded_pair():
    """PSNR rises by more than 10 dB within a few hundred CPU steps (in practice ~40)."""
    _, images = builtin_images("test")
    clean = images[0][:, 100:132, 200:232].contiguous()
    noisy = degrade("noise", clean, 0, NOISE_STRENGTH[50])
    start = float(psnr(noisy, clean))
    model = _tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    best = start
    for step in range(300):
        out = model(noisy[None])
        loss = charbonnier(out, clean[None])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        best = max(best, float(psnr(out[0].clamp(0, 1), clean)))
        if best > start + 10:
            break
    assert best > start + 10, f"PSNR {start:.2f} -> {best:.2f} dB after {step + 1} steps"


def test_run_returns_the_record_the_objective_uses_and_keeps_nothing():
    """``run`` gives (image, record) and stores nothing; ``training_loss`` scores that record;
    ``forward`` keeps it for the accessors, with each ADEC's record as that ADEC's."""
    from moe_restore.losses import LossWeights, restoration_loss

    model = _wake_output(_tiny(num_classes=3, degradation_heads=True))
    degraded, clean, labels = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16), torch.tensor([2, 0])
    weights = LossWeights(classification=0.3)
    restored, record = model.run(degraded, labels=labels)
    assert model.last_record is None and all(adec.moe.last_record is None for adec in model.experts)
    with pytest.raises(RuntimeError, match="after a forward"):
        model.class_logits
    _, want_logits = model.degradation_encoder(degraded)
    assert torch.equal(record.class_logits, want_logits) and len(record.experts) == 3
    assert torch.equal(record.aux_loss, torch.stack([r.losses.aux_loss for r in record.experts]).mean())
    want = restoration_loss(restored.float(), clean, weights=weights, aux_loss=record.aux_loss,
                            class_logits=record.class_logits, labels=labels, inputs=degraded)
    got = model.training_loss(degraded, clean, labels, weights)
    assert torch.equal(got[0], want[0]) and got[1] == want[1] and model.last_record is None
    assert torch.equal(model(degraded, labels=labels), restored)
    assert torch.equal(model.class_logits, record.class_logits) and torch.equal(model.aux_loss, record.aux_loss)
    for adec, kept in zip(model.experts, record.experts):
        assert torch.equal(adec.aux_loss, kept.losses.aux_loss)
        assert torch.equal(adec.moe.last_routing.experts, kept.routing.experts)
