"""
bench/pilot_autoencoder.py: tiny world v2, pilot B, first check (issue #19). Can a small frozen autoencoder
stand in for SD3's VAE without breaking the tiny world's rewards?

Pilot A (docs/NOTES.md) found the GenEval and OCR experts' Flow-GRPO gradients to be noise: the SDE's
exploration noise lives in 3,072 pixel dimensions, most of them prompt-specific. SD3 explores in a VAE
latent (12x fewer numbers than pixels) whose decoder turns a latent step into a structured image change.
The tiny world's "VAE" today is an exact pixel-unshuffle (no compression). Before a base is rebuilt
on a learnt latent, this script checks that the latent keeps what the rewards read:

  1. trains a convolutional autoencoder, 32x32x3 pixels <-> (C, 8, 8) latents (C = 4: SD3's 12x
     compression), on ground-truth scenes of every task (rendered on the fly, tiny_world.render_batch),
     with Gaussian noise on the latent during training so that the decoder tolerates a denoiser's errors;
  2. scores each task's test prompts on the ground truth, on decode(encode(truth)), and on
     decode(encode(truth) + noise) at latent noise 0.1 and 0.3 of the latent's std: the gate is that
     decoded ground truth keeps each reward within 0.05 of the truth (quality rewards included, which a
     blurry decoder would fail);
  3. writes the autoencoder as vae.* tensors with SD3's latent normalisation (vae.shift, vae.scale), the
     form a tiny base carries it in (tiny_world.load_codec; tiny_pretrain.py pretrain --autoencoder), and
     a JSON of the table.

Command (CPU, one thread: 13 minutes for the default 3,000 steps, measured beside another one-thread job):
  python bench/pilot_autoencoder.py --threads 1 --out /tmp/pilot/ae.safetensors
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: bench/ sits above nothing
import runs  # noqa: E402
import tiny_world as tw  # noqa: E402


def scenes(rng, n):
    tasks, weights = list(tw.TASKS), [0.4, 0.4, 0.1, 0.1]  # tiny_pretrain.PRETRAIN_MIX
    prompts = [tw.make_prompt(tasks[rng.choice(4, p=weights)], rng) for _ in range(n)]
    return tw.render_batch(prompts, rng)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, default=4, help="latent channels at 8x8 (4: SD3's 12x compression)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--latent-noise", type=float, default=0.1, help="std of the training noise on the latent, in latent stds")
    p.add_argument("--n", type=int, default=64, help="test prompts per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="the autoencoder's .safetensors (a .json table beside it)")
    cfg = p.parse_args()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    enc, dec = tw.build_autoencoder(cfg.channels)
    params = [*enc.parameters(), *dec.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    print(f"autoencoder: {sum(q.numel() for q in params) / 1e3:.0f}k parameters, latent ({cfg.channels}, 8, 8) = "
          f"{cfg.channels * 64} numbers for 3,072 pixels ({3072 / (cfg.channels * 64):.0f}x)")
    t0, avg = time.time(), None
    for step in range(cfg.steps):
        x = scenes(rng, cfg.batch)
        z = enc(x)
        z = z + cfg.latent_noise * z.detach().std() * torch.randn_like(z)
        y = dec(z)
        loss = F.mse_loss(y, x) + 0.5 * F.l1_loss(y, x) + 1e-4 * z.pow(2).mean()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / 100) * (1 - step / cfg.steps)  # warmup, linear decay
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if (step + 1) % 250 == 0:
            print(f"step {step + 1}: loss {avg:.4f} ({time.time() - t0:.0f} s)", flush=True)

    enc.eval(), dec.eval()
    eval_rng = np.random.default_rng(1)
    with torch.no_grad():
        z_all = torch.cat([enc(scenes(eval_rng, 64)) for _ in range(4)])
        z_mean, z_std = z_all.mean().item(), z_all.std().item()
        rows = {}
        print(f"\nlatent std {z_std:.3f}; rewards on {cfg.n} test prompts per task (strict GenEval)")
        print(f"{'task':10s} {'truth':>6s} {'decoded':>8s} {'+0.1':>6s} {'+0.3':>6s} {'psnr':>6s}")
        for task in tw.TASKS:
            prompts = tw.read_prompts(task, "test")[:cfg.n]
            truth = tw.render_batch(prompts, eval_rng)
            z = enc(truth)
            decoded = dec(z)
            noisy = {s: dec(z + s * z_std * torch.randn_like(z)) for s in (0.1, 0.3)}
            mse = F.mse_loss(decoded, truth).item()
            r = dict(truth=tw.score(task, truth, prompts).mean().item(), decoded=tw.score(task, decoded, prompts).mean().item(),
                     noise_0_1=tw.score(task, noisy[0.1], prompts).mean().item(),
                     noise_0_3=tw.score(task, noisy[0.3], prompts).mean().item(), psnr=10 * np.log10(1 / mse))
            rows[task] = r
            print(f"{task:10s} {r['truth']:6.3f} {r['decoded']:8.3f} {r['noise_0_1']:6.3f} {r['noise_0_3']:6.3f} {r['psnr']:6.1f}")
    gate = all(abs(r["decoded"] - r["truth"]) <= 0.05 for r in rows.values())
    print(f"gate (decoded ground truth within 0.05 of the truth on every task): {'passes' if gate else 'fails'}")
    # SD3's latent normalisation: z = (encoder(x) - shift) * scale has mean 0 and std 1 on scenes
    state = {f"vae.encoder.{k}": v for k, v in enc.state_dict().items()}
    state.update({f"vae.decoder.{k}": v for k, v in dec.state_dict().items()})
    state.update({"vae.shift": torch.tensor(z_mean), "vae.scale": torch.tensor(1 / z_std)})
    runs.save_tensors(cfg.out, state)
    runs.write_json(os.path.splitext(cfg.out)[0] + ".json", dict(config=vars(cfg), latent_std=z_std, rows=rows, gate=gate,
                                                                   seconds=round(time.time() - t0)))


if __name__ == "__main__":
    main()
