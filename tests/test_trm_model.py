"""SequenceTRM and its TinyRecursiveNetwork: masking, recursion, halting, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_trm.models.trm import SequenceTRM, TinyRecursiveNetwork, TRMState

D = 16
SMALL = dict(n_layers=2, n_heads=2, n_latent_steps=2, n_deep_recursions=2, n_supervision_steps=3)


def make_trm(seed: int = 0, **overrides) -> SequenceTRM:
    torch.manual_seed(seed)
    return SequenceTRM(D, **{**SMALL, **overrides}).eval()


def right_padded(lengths: list[int], d: int = D, seed: int = 1, pad_value: float = 7.0):
    """Random x [B, Lmax, d] with garbage (not zero) in the padding, and its mask."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.full((len(lengths), max(lengths), d), pad_value)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for row, length in enumerate(lengths):
        x[row, :length] = torch.randn(length, d, generator=generator) * 2.0
        mask[row, :length] = True
    return x, mask


# ---------------------------------------------------------------- network


def test_network_ignores_padding_and_zeroes_padded_positions():
    torch.manual_seed(0)
    net = TinyRecursiveNetwork(D, n_layers=2, n_heads=4).eval()
    x, mask = right_padded([4, 2, 6])
    out = net(x, mask)
    assert out.shape == (3, 6, D)
    assert torch.isfinite(out).all()
    assert (out[~mask] == 0).all()
    # changing what sits in the padding leaves real outputs untouched
    other = x.clone()
    other[~mask] = -123.0
    torch.testing.assert_close(net(other, mask)[mask], out[mask], atol=1e-6, rtol=0)


def test_network_fully_padded_sample_gives_no_nan():
    net = TinyRecursiveNetwork(D, n_heads=4)
    x = torch.randn(2, 5, D)
    mask = torch.tensor([[True, True, False, False, False], [False] * 5])
    out = net(x, mask)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()


@pytest.mark.parametrize("n_heads", [3, 0])
def test_heads_must_divide_width(n_heads):
    with pytest.raises(ValueError, match="n_heads"):
        TinyRecursiveNetwork(D, n_heads=n_heads)
    with pytest.raises(ValueError, match="n_heads"):
        SequenceTRM(D, n_heads=n_heads)


# ---------------------------------------------------------- reasoning token


def test_initial_state_places_reasoning_token_after_last_real_token():
    trm = make_trm()
    x, mask = right_padded([3, 1, 5])
    state = trm.initial_state(x, mask)
    assert state.x_aug.shape == state.y.shape == state.z.shape == (3, 6, D)
    assert state.reasoning_index.tolist() == [3, 1, 5]
    assert state.mask_aug.sum(dim=1).tolist() == [4, 2, 6]
    for row, length in enumerate([3, 1, 5]):
        torch.testing.assert_close(state.x_aug[row, length], trm.reasoning_token.detach())
        torch.testing.assert_close(state.x_aug[row, :length], x[row, :length])
        assert (state.x_aug[row, length + 1 :] == 0).all()  # garbage padding was zeroed
    assert (state.z == 0).all()
    assert not state.y.requires_grad


def test_left_padding_is_rejected():
    trm = make_trm()
    mask = torch.tensor([[False, True, True]])
    with pytest.raises(ValueError, match="right-padded"):
        trm.initial_state(torch.randn(1, 3, D), mask)


def test_padded_batch_matches_each_sample_alone():
    trm = make_trm(use_positions=True)
    lengths = [5, 2, 7, 0]
    x, mask = right_padded(lengths)
    with torch.no_grad():
        batch_state, batch_pred, batch_logit = trm.deep_recursion(trm.initial_state(x, mask))
        batch_out = trm(x, mask, halt=False)
        for row, length in enumerate(lengths):
            alone_x, alone_mask = x[row : row + 1, :length], mask[row : row + 1, :length]
            _, pred, logit = trm.deep_recursion(trm.initial_state(alone_x, alone_mask))
            torch.testing.assert_close(batch_pred[row : row + 1], pred, atol=1e-5, rtol=0)
            torch.testing.assert_close(batch_logit[row : row + 1], logit, atol=1e-5, rtol=0)
            alone_out = trm(alone_x, alone_mask, halt=False)
            torch.testing.assert_close(batch_out.prediction[row : row + 1], alone_out.prediction, atol=1e-5, rtol=0)
            torch.testing.assert_close(batch_out.halt_logit[row : row + 1], alone_out.halt_logit, atol=1e-5, rtol=0)
    # the states beyond each sample's reasoning token stay finite (and zero)
    assert torch.isfinite(batch_state.y).all() and torch.isfinite(batch_state.z).all()
    assert (batch_state.y[~batch_state.mask_aug] == 0).all()
    assert torch.isfinite(batch_out.prediction).all()


# --------------------------------------------------------------- recursion


def test_latent_recursion_follows_the_trm_update_rule():
    trm = make_trm(n_latent_steps=3)
    generator = torch.Generator().manual_seed(2)
    x, y, z = (torch.randn(2, 5, D, generator=generator) for _ in range(3))
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        new_y, new_z = trm.latent_recursion(x, y, z, mask)
        for _ in range(3):  # z <- net(x + y + z), n times; then y <- net(y + z)
            z = trm.net(x + y + z, mask)
        y = trm.net(y + z, mask)
    torch.testing.assert_close(new_z, z, atol=0, rtol=0)
    torch.testing.assert_close(new_y, y, atol=0, rtol=0)


# --------------------------------------------------------------- gradients


def count_net_calls(trm: SequenceTRM) -> dict[str, int]:
    calls = {"total": 0, "with_grad": 0}

    def hook(module, args, output):
        calls["total"] += 1
        calls["with_grad"] += int(torch.is_grad_enabled())

    trm.net.register_forward_hook(hook)
    return calls


def test_deep_recursion_backpropagates_through_last_recursion_only():
    trm = make_trm(n_deep_recursions=3, use_positions=True).train()
    calls = count_net_calls(trm)
    x, mask = right_padded([4, 6])
    state, prediction, halt_logit = trm.deep_recursion(trm.initial_state(x, mask))
    target = torch.randn(2, D, generator=torch.Generator().manual_seed(5))
    loss = (prediction - target).pow(2).mean() + halt_logit.sigmoid().mean()
    loss.backward()

    per_latent = SMALL["n_latent_steps"] + 1
    assert calls == {"total": 3 * per_latent, "with_grad": per_latent}
    for name, parameter in trm.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # y and z stay attached for the caller; detach() cuts them
    assert state.y.requires_grad and state.z.requires_grad
    detached = state.detach()
    assert not detached.y.requires_grad and not detached.z.requires_grad
    assert detached.x_aug is state.x_aug

    # a hand-written version: two recursions without grad, one with
    expected = {name: p.grad.clone() for name, p in trm.named_parameters()}
    trm.zero_grad()
    manual = trm.initial_state(x, mask)
    x_aug, mask_aug, index = trm.augment(x, mask)
    y, z = manual.y, manual.z
    with torch.no_grad():
        for _ in range(2):
            y, z = trm.latent_recursion(x_aug, y, z, mask_aug)
    y, z = trm.latent_recursion(x_aug, y, z, mask_aug)
    manual_prediction = trm.read_prediction(y, index)
    manual_logit = trm.halt_head(manual_prediction).squeeze(-1)
    ((manual_prediction - target).pow(2).mean() + manual_logit.sigmoid().mean()).backward()
    torch.testing.assert_close(manual_prediction, prediction)
    for name, parameter in trm.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], atol=1e-7, rtol=1e-5)


def test_per_step_training_loop_runs_with_detached_state():
    trm = make_trm().train()
    optimizer = torch.optim.SGD(trm.parameters(), lr=0.1)
    x, mask = right_padded([3, 5])
    state = trm.initial_state(x, mask)
    for _ in range(2):  # backward + step each supervision step, as the paper trains
        state, prediction, _ = trm.deep_recursion(state)
        prediction.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        state = state.detach()
    assert isinstance(state, TRMState)


# ----------------------------------------------------------------- halting


def test_fresh_model_does_not_halt_immediately():
    trm = make_trm()
    x, mask = right_padded([3, 5, 2])
    with torch.no_grad():
        out = trm(x, mask)
    assert (out.halt_prob < 0.5).all()
    assert out.steps_used.tolist() == [3, 3, 3]


def test_halt_bias_extremes():
    trm = make_trm()
    x, mask = right_padded([3, 5])
    with torch.no_grad():
        trm.halt_head.weight.zero_()
        trm.halt_head.bias.fill_(10.0)
        out = trm(x, mask, n_supervision_steps=4)
        assert out.steps_used.tolist() == [1, 1] and len(out.step_predictions) == 1
        trm.halt_head.bias.fill_(-10.0)
        out = trm(x, mask, n_supervision_steps=4)
        assert out.steps_used.tolist() == [4, 4] and len(out.step_predictions) == 4
        trm.halt_head.bias.fill_(10.0)
        out = trm(x, mask, n_supervision_steps=4, halt=False)
        assert out.steps_used.tolist() == [4, 4]
        torch.testing.assert_close(out.halt_prob, torch.sigmoid(torch.tensor([10.0, 10.0])))


def test_per_sample_halting_freezes_halted_samples():
    trm = make_trm()
    n_sup = 4
    x, mask = right_padded([3, 6], seed=3)
    with torch.no_grad():
        reference = trm(x, mask, n_supervision_steps=n_sup, halt=False)
        # a halt head with logit +10 on sample 0's first prediction and -10 on all
        # of sample 1's predictions: sample 0 halts at step 1, sample 1 never
        points = torch.stack([reference.step_predictions[0][0]] + [p[1] for p in reference.step_predictions])
        targets = torch.tensor([10.0] + [-10.0] * n_sup, dtype=torch.float64)
        design = torch.cat([points.double(), torch.ones(len(points), 1, dtype=torch.float64)], dim=1)
        solution = torch.linalg.lstsq(design, targets[:, None]).solution.squeeze(1)
        trm.halt_head.weight.copy_(solution[:-1].float()[None])
        trm.halt_head.bias.fill_(float(solution[-1]))

        batch_sizes: list[int] = []
        trm.net.register_forward_hook(lambda module, args, output: batch_sizes.append(args[0].shape[0]))
        out = trm(x, mask, n_supervision_steps=n_sup)

    assert out.steps_used.tolist() == [1, n_sup]
    assert len(out.step_predictions) == n_sup
    assert out.halt_prob[0] > 0.99 and out.halt_prob[1] < 0.01
    # sample 0 is frozen at its first prediction, sample 1 runs to the end
    torch.testing.assert_close(out.prediction[0], reference.step_predictions[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.prediction[1], reference.prediction[1], atol=1e-5, rtol=0)
    for step_prediction in out.step_predictions:
        torch.testing.assert_close(step_prediction[0], out.prediction[0])
    # the halted sample is not recomputed: after step 1 the net sees one row
    calls_per_step = SMALL["n_deep_recursions"] * (SMALL["n_latent_steps"] + 1)
    assert batch_sizes == [2] * calls_per_step + [1] * (n_sup - 1) * calls_per_step


# --------------------------------------------------------------- positions


def roughen(net: TinyRecursiveNetwork) -> None:
    """Weights well away from the near-identity init, so order effects are plain."""
    for name, parameter in net.named_parameters():
        if "norm" not in name:
            parameter.normal_(std=0.5)


def permute_real_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    order = torch.arange(length).flip(0)
    permuted = x.clone()
    permuted[:, :length] = x[:, order]
    return permuted


def test_without_positions_reasoning_output_ignores_token_order():
    trm = make_trm(use_positions=False)
    x, mask = right_padded([6])
    with torch.no_grad():
        # default init: large weights make the recursion chaotic, and float
        # rounding differences then grow past any tolerance
        original = trm(x, mask, halt=False)
        permuted = trm(permute_real_tokens(x, 6), mask, halt=False)
    torch.testing.assert_close(permuted.prediction, original.prediction, atol=1e-5, rtol=0)
    torch.testing.assert_close(permuted.halt_logit, original.halt_logit, atol=1e-5, rtol=0)


def test_with_positions_token_order_matters():
    trm = make_trm(use_positions=True)
    x, mask = right_padded([6])
    with torch.no_grad():
        # at init (std 0.02) attention is near uniform, and a uniform average of
        # x_i + p_i does not see the order: give the weights some size
        roughen(trm.net)
        original = trm(x, mask, halt=False)
        permuted = trm(permute_real_tokens(x, 6), mask, halt=False)
    assert (permuted.prediction - original.prediction).abs().max() > 1e-2


def test_network_is_permutation_equivariant_only_without_positions():
    x, mask = right_padded([5])
    order = torch.tensor([3, 0, 4, 1, 2])
    for use_positions, equivariant in [(False, True), (True, False)]:
        torch.manual_seed(0)
        net = TinyRecursiveNetwork(D, n_heads=4, use_positions=use_positions).eval()
        with torch.no_grad():
            roughen(net)
            moved = net(x[:, order], mask)
            expected = net(x, mask)[:, order]
        assert torch.allclose(moved, expected, atol=1e-5) == equivariant


# ------------------------------------------------------------------ export


def test_save_and_load_round_trip(tmp_path):
    trm = make_trm(use_positions=True, mlp_ratio=2.0)
    with torch.no_grad():
        trm.halt_head.bias.fill_(0.3)  # something the default init would not give
    folder = trm.save_pretrained(tmp_path / "trm", metadata={"d_model": 64, "layer": -1})
    assert (folder / "trm.safetensors").exists()

    loaded = SequenceTRM.from_pretrained(folder).eval()
    assert loaded.config() == trm.config()
    assert loaded.metadata == {"d_model": 64, "layer": -1}
    x, mask = right_padded([4, 2])
    with torch.no_grad():
        expected, actual = trm(x, mask), loaded(x, mask)
    assert torch.equal(actual.prediction, expected.prediction)
    assert torch.equal(actual.halt_logit, expected.halt_logit)
    assert torch.equal(actual.steps_used, expected.steps_used)


def test_normalization_buffers_standardise_inputs_and_rescale_predictions(tmp_path):
    torch.manual_seed(0)
    trm = SequenceTRM(8, n_layers=1, n_heads=2, n_latent_steps=1, n_deep_recursions=1, n_supervision_steps=1)
    x = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    plain = trm(x, mask, halt=False).prediction
    offset, spread = torch.full((8,), 40.0), torch.linspace(0.5, 2.0, 8)
    trm.set_normalization(input_mean=offset, input_scale=3.0, target_mean=offset, target_scale=spread)
    shifted = trm(x * 3.0 + offset, mask, halt=False).prediction
    # inputs are standardised on the way in, predictions mapped to target units on the way out
    torch.testing.assert_close(shifted, plain * spread + offset, atol=1e-4, rtol=1e-4)
    trm.save_pretrained(tmp_path)
    loaded = SequenceTRM.from_pretrained(tmp_path)
    assert bool(loaded.normalization_fitted) and torch.equal(loaded.target_scale, spread)
    torch.testing.assert_close(loaded(x * 3.0 + offset, mask, halt=False).prediction, shifted)


# ------------------------------------------------------------ m = 1 is today's model

M1_REFERENCE = Path(__file__).resolve().parent / "data" / "trm_m1_reference.safetensors"


def m1_reference_outputs() -> dict[str, torch.Tensor]:
    """A fixed-seed m = 1 SequenceTRM (normalised, with a halt head that stops some samples early): its
    forward with halting, every step's prediction, and the gradient of a loss through the last step."""
    trm = make_trm(seed=11, use_positions=True, n_supervision_steps=4)
    generator = torch.Generator().manual_seed(12)
    trm.set_normalization(torch.randn(D, generator=generator), 1.7, torch.randn(D, generator=generator),
                          torch.rand(D, generator=generator) + 0.5)
    with torch.no_grad():
        trm.halt_head.weight.normal_(std=1.0, generator=generator)
        trm.halt_head.bias.fill_(-5.0)  # samples 1 and 4 halt at step 1, the others run all 4
    x, mask = right_padded([5, 2, 7, 3, 4], seed=13)
    out = trm.train()(x, mask)
    (out.prediction.pow(2).mean() + out.halt_logit.sigmoid().mean()).backward()
    values = {"prediction": out.prediction.detach(), "halt_logit": out.halt_logit.detach(),
              "steps_used": out.steps_used, "step_predictions": torch.stack(out.step_predictions)}
    values.update({f"grad.{name}": p.grad for name, p in trm.named_parameters()})
    values["grad.net.positions.weight"] = values["grad.net.positions.weight"][: x.shape[1] + 1]  # the rows used
    return values


def test_one_reasoning_token_is_bit_for_bit_the_model_before_m_states():
    """The outputs and gradients saved from main before `n_reasoning_tokens` existed (same seed, same CPU
    kernels): m = 1 must not change a bit."""
    expected = load_file(str(M1_REFERENCE))
    actual = m1_reference_outputs()
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


# ------------------------------------------------------------ m reasoning tokens

M = 4


def test_m_reasoning_tokens_are_written_after_each_prompt_and_predicted_per_state():
    trm = make_trm(n_reasoning_tokens=M)
    assert trm.reasoning_token.shape == (M, D) and trm.prediction_shape == (M, D)
    lengths = [3, 1, 5]
    x, mask = right_padded(lengths)
    state = trm.initial_state(x, mask)
    assert state.x_aug.shape == state.y.shape == (3, 5 + M, D)
    assert state.reasoning_index.tolist() == lengths
    assert state.mask_aug.sum(dim=1).tolist() == [length + M for length in lengths]
    for row, length in enumerate(lengths):
        torch.testing.assert_close(state.x_aug[row, length : length + M], trm.reasoning_token.detach(), atol=0, rtol=0)
        torch.testing.assert_close(state.x_aug[row, :length], x[row, :length], atol=0, rtol=0)
        assert (state.x_aug[row, length + M :] == 0).all()
    with torch.no_grad():
        new_state, prediction, halt_logit = trm.deep_recursion(state)
        out = trm(x, mask, halt=False)
    assert prediction.shape == out.prediction.shape == (3, M, D) and halt_logit.shape == (3,)
    assert len(out.step_predictions) == SMALL["n_supervision_steps"]
    assert all(p.shape == (3, M, D) for p in out.step_predictions)
    for row, length in enumerate(lengths):  # y at the m reasoning positions, in order
        torch.testing.assert_close(prediction[row], new_state.y[row, length : length + M], atol=0, rtol=0)
    # one halt decision per sample, from the mean of its reasoning tokens' states
    torch.testing.assert_close(halt_logit, trm.halt_head(prediction.mean(1)).squeeze(-1), atol=1e-6, rtol=0)
    # the m predictions differ (each token has its own vector)
    assert (prediction[:, 0] - prediction[:, 1]).abs().max() > 1e-3


def test_m_tokens_padded_batch_matches_each_sample_alone_with_halting():
    trm = make_trm(n_reasoning_tokens=M, use_positions=True, n_supervision_steps=4)
    with torch.no_grad():
        trm.halt_head.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(4))
        trm.halt_head.bias.fill_(-1.0)
    lengths = [5, 2, 7, 0]
    x, mask = right_padded(lengths)
    with torch.no_grad():
        batch_out = trm(x, mask)
        for row, length in enumerate(lengths):
            alone = trm(x[row : row + 1, :length], mask[row : row + 1, :length])
            torch.testing.assert_close(batch_out.prediction[row : row + 1], alone.prediction, atol=1e-5, rtol=0)
            assert batch_out.steps_used[row] == alone.steps_used[0]
    assert len(set(batch_out.steps_used.tolist())) > 1  # some samples halted before others


def test_m_tokens_target_normalisation_is_per_state():
    torch.manual_seed(0)
    trm = SequenceTRM(8, n_layers=1, n_heads=2, n_latent_steps=1, n_deep_recursions=1, n_supervision_steps=1,
                      n_reasoning_tokens=3)
    x, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    plain = trm(x, mask, halt=False)
    mean = torch.arange(24.0).view(3, 8)
    scale = torch.linspace(0.5, 2.0, 24).view(3, 8)
    trm.set_normalization(input_mean=torch.zeros(8), input_scale=1.0, target_mean=mean, target_scale=scale)
    normalised = trm(x, mask, halt=False)
    torch.testing.assert_close(normalised.prediction, plain.prediction * scale + mean, atol=1e-4, rtol=1e-5)
    # the halt head reads normalised states: the target statistics do not move it
    torch.testing.assert_close(normalised.halt_logit, plain.halt_logit)


def test_m_tokens_forward_carries_one_step_of_gradient_to_every_token():
    trm = make_trm(n_reasoning_tokens=M).train()
    x, mask = right_padded([4, 6])
    with torch.no_grad():
        reference = trm(x, mask)
    out = trm(x, mask)
    torch.testing.assert_close(out.prediction, reference.prediction, atol=1e-6, rtol=0)
    (out.prediction.pow(2).mean() + out.halt_logit.sigmoid().mean()).backward()
    assert (trm.reasoning_token.grad.abs().sum(1) > 0).all()  # each of the m tokens learns


def test_m_tokens_export_records_m_and_old_exports_load_as_one(tmp_path):
    trm = make_trm(n_reasoning_tokens=M)
    folder = trm.save_pretrained(tmp_path / "m4")
    assert json.loads((folder / "config.json").read_text())["n_reasoning_tokens"] == M
    loaded = SequenceTRM.from_pretrained(folder)
    assert loaded.n_reasoning_tokens == M and loaded.config() == trm.config()
    x, mask = right_padded([3, 2])
    with torch.no_grad():
        assert torch.equal(loaded(x, mask).prediction, trm(x, mask).prediction)
    # an export written before m existed has no n_reasoning_tokens: it is the one-token model
    old = make_trm().save_pretrained(tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    del config["n_reasoning_tokens"]
    (old / "config.json").write_text(json.dumps(config))
    assert SequenceTRM.from_pretrained(old).n_reasoning_tokens == 1


def test_n_reasoning_tokens_must_be_positive():
    with pytest.raises(ValueError, match="n_reasoning_tokens must be at least 1"):
        SequenceTRM(D, n_reasoning_tokens=0)
