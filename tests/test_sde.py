"""sde.py against closed forms and references: the schedule against diffusers' scheduler, the step's
log-density against torch.distributions, its samples against the stated mean and std, the dense KL
against the Gaussian KL, and the sampler's determinism and on-policy log-probs."""

import math

import pytest
import torch

import sde


def reference_step(v, sigma, sigma_next, x, a):
    """The paper's Euler-Maruyama step written out independently of sde.py (PAPER-NOTES, section 1)."""
    sigma, sigma_next = torch.as_tensor(sigma).reshape(-1, 1, 1, 1), torch.as_tensor(sigma_next).reshape(-1, 1, 1, 1)
    dt = sigma_next - sigma
    s = a * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))
    mean = x * (1 + s**2 * dt / (2 * sigma)) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, s * torch.sqrt(-dt)


@pytest.mark.parametrize("steps,shift", [(10, 3.0), (40, 3.0), (7, 1.0)])
def test_sigmas_match_diffusers_scheduler(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(sde.sd3_sigmas(steps, shift), scheduler.sigmas.float(), atol=1e-6, rtol=0)
    assert sde.sd3_sigmas(steps, shift)[0] == 1 and sde.sd3_sigmas(steps, shift)[-1] == 0


def test_log_prob_is_the_gaussian_log_density_averaged_over_dims():
    torch.manual_seed(0)
    B = 5
    sigmas = sde.sd3_sigmas(10)
    sigma, sigma_next = sigmas[[0, 2, 4, 7, 9]], sigmas[[1, 3, 5, 8, 10]]  # per-sample times, incl. sigma = 1 and the last step
    v, x, prev = torch.randn(B, 4, 6, 6), torch.randn(B, 4, 6, 6), torch.randn(B, 4, 6, 6)
    _, log_prob, mean, std = sde.sde_step_with_logprob(v, sigma, sigma_next, x, 0.7, prev_sample=prev)
    ref_mean, ref_std = reference_step(v, sigma, sigma_next, x, 0.7)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(std.expand_as(ref_std), ref_std)
    expected = torch.distributions.Normal(ref_mean, ref_std).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected)
    assert log_prob.shape == (B,) and torch.isfinite(log_prob).all()


def test_float_sigmas_and_bf16_inputs_compute_in_float32():
    v, x = torch.randn(2, 4, 4, 4, dtype=torch.bfloat16), torch.randn(2, 4, 4, 4, dtype=torch.bfloat16)
    prev, log_prob, mean, _ = sde.sde_step_with_logprob(v, 0.5, 0.4, x, 0.7, generator=torch.Generator().manual_seed(0))
    assert prev.dtype == log_prob.dtype == mean.dtype == torch.float32
    ref_mean, _ = reference_step(v.float(), torch.tensor([0.5, 0.5]), torch.tensor([0.4, 0.4]), x.float(), 0.7)
    torch.testing.assert_close(mean, ref_mean)


def test_samples_have_the_stated_mean_and_std():
    # 20k samples of 64 dims: the empirical moments are within ~1% of the truth; a step with a wrong
    # drift term or a std off by sqrt(|dt|) misses by far more.
    n, sigma, sigma_next = 20000, 0.6, 0.45
    v, x = torch.full((n, 1, 8, 8), 0.5), torch.full((n, 1, 8, 8), 1.0)
    prev, _, _, _ = sde.sde_step_with_logprob(v, sigma, sigma_next, x, 0.7, generator=torch.Generator().manual_seed(1))
    ref_mean, ref_std = reference_step(v[:1], sigma, sigma_next, x[:1], 0.7)
    assert abs(prev.mean().item() - ref_mean.mean().item()) < 0.005 * ref_std.item()  # ~5 standard errors
    assert abs(prev.std().item() / ref_std.item() - 1) < 0.01
    # and the ODE limit is different: the SDE's mean is not x + v dt
    assert abs(ref_mean.mean().item() - (1.0 + 0.5 * (sigma_next - sigma))) > 0.05 * ref_std.item()


def test_noise_level_zero_is_the_diffusers_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn_like(x)
        expected = scheduler.step(v, t, x, return_dict=False)[0]
        prev, log_prob, _, _ = sde.sde_step_with_logprob(v, scheduler.sigmas[i].item(), scheduler.sigmas[i + 1].item(), x, noise_level=0)
        torch.testing.assert_close(prev, expected)
        assert torch.all(log_prob == 0) and torch.isfinite(prev).all()
        x = expected


def test_log_prob_gradient_flows_through_the_velocity_only():
    v = torch.randn(3, 4, 4, 4, requires_grad=True)
    x = torch.randn(3, 4, 4, 4)
    prev = torch.randn(3, 4, 4, 4, requires_grad=True)
    _, log_prob, _, _ = sde.sde_step_with_logprob(v, 0.7, 0.5, x, 0.7, prev_sample=prev)
    log_prob.sum().backward()
    assert v.grad.abs().sum() > 0 and prev.grad is None


def test_velocity_kl_is_the_gaussian_kl_between_the_two_steps():
    torch.manual_seed(0)
    sigmas = sde.sd3_sigmas(10)
    sigma, sigma_next = sigmas[[0, 3, 8]], sigmas[[1, 4, 9]]
    x, v_s, v_t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    _, _, mean_s, std = sde.sde_step_with_logprob(v_s, sigma, sigma_next, x, 0.7)
    _, _, mean_t, _ = sde.sde_step_with_logprob(v_t, sigma, sigma_next, x, 0.7)
    kl = sde.velocity_kl(v_s, v_t, sigma, sigma_next, 0.7)
    torch.testing.assert_close(kl, ((mean_s - mean_t) ** 2).mean(dim=(1, 2, 3)) / (2 * std.reshape(-1) ** 2))
    std = std.expand_as(mean_s)
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(mean_s, std), torch.distributions.Normal(mean_t, std))
    torch.testing.assert_close(kl, exact.mean(dim=(1, 2, 3)))


def test_velocity_kl_is_zero_iff_equal_and_scales_as_w():
    v = torch.randn(2, 4, 4, 4)
    assert torch.all(sde.velocity_kl(v, v.clone(), 0.8, 0.6) == 0)
    assert torch.all(sde.velocity_kl(v, v + 1e-3, 0.8, 0.6) > 0)
    delta = torch.randn_like(v)
    kl1, kl2 = sde.velocity_kl(v + delta, v, 0.8, 0.6), sde.velocity_kl(v + 2 * delta, v, 0.8, 0.6)
    torch.testing.assert_close(kl2, 4 * kl1)
    w = (0.2 / 2) * (0.7 * math.sqrt(0.8 / 0.2) * 0.2 / 1.6 + 1 / (0.7 * math.sqrt(0.8 / 0.2))) ** 2
    torch.testing.assert_close(kl1, w * (delta**2).mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="noise_level"):
        sde.velocity_kl(v, v, 0.8, 0.6, noise_level=0)


def test_sample_is_reproducible_and_batch_independent(toy_world):
    prompts = ["red circle", "blue square", "two stars", "red circle"]
    a = sde.sample(toy_world, prompts, steps=4, noise_level=0.7, seeds=[1, 2, 3, 4])
    b = sde.sample(toy_world, prompts, steps=4, noise_level=0.7, seeds=[1, 2, 3, 4])
    torch.testing.assert_close(a["latents"], b["latents"], rtol=0, atol=0)
    assert a["latents"].shape == (4, 5, 4, 8, 8) and a["log_probs"].shape == (4, 4) and a["images"].shape == (4, 3, 8, 8)
    # the same (prompt, seed) drawn alone or in another batch gives the same trajectory
    alone = sde.sample(toy_world, prompts[2:3], steps=4, noise_level=0.7, seeds=[3])
    torch.testing.assert_close(alone["latents"][0], a["latents"][2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a["latents"][0], a["latents"][3])  # same prompt, other seed, other sample
    # the ODE is deterministic given the initial noise and ends elsewhere than the SDE
    ode = sde.sample(toy_world, prompts, steps=4, noise_level=0.0, seeds=[1, 2, 3, 4])
    torch.testing.assert_close(ode["latents"][:, 0], a["latents"][:, 0], rtol=0, atol=0)
    assert not torch.allclose(ode["latents"][:, -1], a["latents"][:, -1])


def test_sde_window_is_ode_outside_and_sde_inside(toy_world):
    """Flow-GRPO-Fast's window: the steps outside it are exact Euler steps (log-prob 0), and the window
    is reproducible per (seed, epoch), inside the first half, and covers every step when 0."""
    prompts, seeds = ["red circle", "blue square"], [1, 2]
    ode = sde.sample(toy_world, prompts, steps=6, noise_level=0.0, seeds=seeds)
    none = sde.sample(toy_world, prompts, steps=6, noise_level=0.7, seeds=seeds, sde_steps=[])
    torch.testing.assert_close(none["latents"], ode["latents"], rtol=0, atol=0)
    win = sde.sample(toy_world, prompts, steps=6, noise_level=0.7, seeds=seeds, sde_steps=[1, 2])
    torch.testing.assert_close(win["latents"][:, :2], ode["latents"][:, :2], rtol=0, atol=0)  # x_1 and the step-0 result
    assert not torch.allclose(win["latents"][:, 2], ode["latents"][:, 2])
    assert (win["log_probs"][:, [0, 3, 4, 5]] == 0).all() and (win["log_probs"][:, [1, 2]] != 0).all()
    assert sde.sde_window_steps(10, 0, seed=0, epoch=3) == list(range(10))
    starts = {sde.sde_window_steps(10, 2, seed=0, epoch=e)[0] for e in range(40)}
    assert starts == {0, 1, 2, 3}  # windows of 2 inside the first half (steps 0..4)
    assert sde.sde_window_steps(10, 2, 0, 7) == sde.sde_window_steps(10, 2, 0, 7)
    with pytest.raises(ValueError, match="window"):
        sde.sde_window_steps(4, 5, 0, 0)
    assert all(sde.sde_window_steps(10, 1, 0, e, start=0) == [0] for e in range(5))  # a fixed start, every epoch
    assert sde.sde_window_steps(10, 2, 0, 0, start=8) == [8, 9]  # any start that fits, not only the first half
    for window, start in ((0, 0), (2, 9), (2, -1)):
        with pytest.raises(ValueError, match="needs an SDE window"):
            sde.sde_window_steps(10, window, 0, 0, start=start)


def test_shared_initial_noise_makes_a_group_differ_only_by_its_sde_steps(toy_world):
    """init_seeds (grpo_expert.py --same-latent): samples with one init seed start from the same x_1,
    follow the same ODE path up to the window, and part there; each sample's own seed still drives its
    step noise, and x_1 is the one an unshared sample with that seed would draw."""
    prompts, seeds = ["red circle"] * 3, [1, 2, 3]
    shared = sde.sample(toy_world, prompts, steps=6, noise_level=0.7, seeds=seeds, sde_steps=[2, 3], init_seeds=[9, 9, 9])
    lat = shared["latents"]
    for i in (1, 2):  # x_1 identical; the two ODE steps identical up to float rounding of the batch row
        torch.testing.assert_close(lat[i, 0], lat[0, 0], rtol=0, atol=0)
        torch.testing.assert_close(lat[i, 1:3], lat[0, 1:3], rtol=0, atol=1e-5)
    assert (lat[1, 3] - lat[0, 3]).abs().max() > 0.1 and (lat[2, 3] - lat[1, 3]).abs().max() > 0.1  # the window parts them
    alone = sde.sample(toy_world, prompts[:1], steps=6, noise_level=0.7, seeds=[9], sde_steps=[])
    torch.testing.assert_close(lat[0, 0], alone["latents"][0, 0], rtol=0, atol=0)
    unshared = sde.sample(toy_world, prompts, steps=6, noise_level=0.7, seeds=seeds, sde_steps=[2, 3])
    assert (unshared["latents"][1, 0] - unshared["latents"][0, 0]).abs().max() > 0.1


def test_recomputed_log_prob_equals_the_sampled_one(toy_world):
    """The on-policy sanity check: before any update the PPO ratio is exactly 1."""
    prompts = ["red circle", "blue square"]
    traj = sde.sample(toy_world, prompts, steps=4, guidance_scale=3.0, noise_level=0.7, seeds=[5, 6])
    sigmas = traj["sigmas"]
    for j in range(4):
        v = sde.predict_velocity(toy_world, traj["latents"][:, j], sigmas[j].item(), traj["embeds"], traj["pooled"], 3.0)
        _, log_prob, _, _ = sde.sde_step_with_logprob(v, sigmas[j], sigmas[j + 1], traj["latents"][:, j], 0.7,
                                                      prev_sample=traj["latents"][:, j + 1])
        torch.testing.assert_close(log_prob, traj["log_probs"][:, j], atol=1e-5, rtol=0)


def test_cfg_is_one_batched_forward_of_uncond_and_cond(toy_world):
    x = torch.randn(2, 4, 8, 8)
    embeds, pooled = toy_world.encode_prompts(["red circle", "blue square"])
    null = toy_world.encode_prompts(["", ""])
    v_c = sde.predict_velocity(toy_world, x, 0.5, embeds, pooled, 1.0)
    v_u = sde.predict_velocity(toy_world, x, 0.5, *null, 1.0)
    torch.testing.assert_close(sde.predict_velocity(toy_world, x, 0.5, embeds, pooled, 4.5), v_u + 4.5 * (v_c - v_u), atol=1e-5, rtol=1e-5)
