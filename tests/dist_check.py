"""One check of the distributed plumbing, run under torchrun (gloo, CPU) by tests/test_scale.py.

  python -m torch.distributed.run --nproc_per_node 2 tests/dist_check.py encode <pipeline> <cache> <out>
  python -m torch.distributed.run --nproc_per_node 2 tests/dist_check.py resume <folder of per-rank run dirs>
  python -m torch.distributed.run --nproc_per_node 2 tests/dist_check.py changed <folder of per-rank run dirs>
  python -m torch.distributed.run --nproc_per_node 2 tests/dist_check.py nan <stage script> <its flags>
  python -m torch.distributed.run --nproc_per_node 2 tests/dist_check.py crash <stage script> <its flags>
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import runs  # noqa: E402
import worlds  # noqa: E402

PROMPTS = [f"a prompt with the number {i}" for i in range(50)]


def nan_on_rank_1(script, argv):
    """The stage script as torchrun runs it, except that on rank 1, from the second epoch on, every policy loss
    gets a NaN added that carries no gradient: this rank's loss is NaN while every gradient stays finite."""
    import runpy

    import sde

    if os.environ.get("RANK") == "1":
        epochs, seeds, surrogate = [], sde.epoch_seeds, sde.clipped_surrogate
        sde.epoch_seeds = lambda *a, **k: epochs.append(1) or seeds(*a, **k)
        sde.clipped_surrogate = lambda *a, **k: (lambda loss, ratio: (loss + float("nan") if len(epochs) > 1 else loss,
                                                                      ratio))(*surrogate(*a, **k))
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def crash_on_rank_1(script, argv):
    """The stage script as torchrun runs it, except that on rank 1 the second epoch's sampling raises what a GPU
    out of memory raises: an exception outside every agreement block, while rank 0 goes on to its next collective."""
    import runpy

    import sde

    if os.environ.get("RANK") == "1":
        calls, sample = [], sde.sample

        def failing(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return sample(*a, **k)

        sde.sample = failing
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def main():
    if sys.argv[1] == "nan":
        return nan_on_rank_1(sys.argv[2], sys.argv[3:])
    if sys.argv[1] == "crash":
        return crash_on_rank_1(sys.argv[2], sys.argv[3:])
    dist = runs.setup_distributed()
    torch.set_num_threads(1)
    what = sys.argv[1]
    if what == "encode":  # each rank encodes its share, and every rank then serves every prompt
        pipeline, cache, out = sys.argv[2:5]
        world = worlds.load_world(pipeline, "cpu")
        encoded, raw = [], world.encode_prompts.uncached

        def counting(prompts):
            encoded.extend(prompts)
            return raw(prompts)

        world.encode_prompts.uncached = counting
        worlds.encode_once(world, PROMPTS, cache, batch=8)
        embeds, pooled = world.encode_prompts(PROMPTS)
        runs.save_tensors(os.path.join(out, f"rank{dist.rank}.safetensors"), dict(embeds=embeds, pooled=pooled),
                          metadata=dict(encoded=json.dumps(encoded)))
    elif what == "resume":  # each rank resumes from its own folder: a node-local --out
        run_dir = os.path.join(sys.argv[2], f"rank{dist.rank}")
        params = {"w": torch.nn.Parameter(torch.zeros(3))}
        ema = {"w": torch.zeros(3)}
        optimizer = torch.optim.AdamW(params.values())
        epoch, _ = runs.load_train_state(run_dir, params, ema, optimizer, dist=dist)
        print(f"rank {dist.rank} resumed at epoch {epoch}")
    elif what == "changed":  # only rank 1's folder holds a checkpoint, of a run with another --lr
        # first, the bucketed gradient all-reduce equals one flat all-reduce, and carries a sum along
        runs.BUCKET_ELEMENTS = 7
        g = torch.Generator().manual_seed(dist.rank)
        params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 5, 20, 2, 1)]
        for p in params[:-1]:
            p.grad = torch.randn(p.shape, generator=g)  # the last one has no gradient on any rank
        flat = torch.cat([p.grad for p in params[:-1]] + [torch.zeros(1)])
        torch.distributed.all_reduce(flat)
        total = runs.all_reduce_sum(params, dist, torch.tensor(float(dist.rank + 1)))
        assert torch.equal(torch.cat([p.grad for p in params]), flat) and total.item() == 3.0
        print(f"rank {dist.rank} reduced in buckets")
        run_dir = os.path.join(sys.argv[2], f"rank{dist.rank}")
        params = {"w": torch.nn.Parameter(torch.zeros(3))}
        optimizer = torch.optim.AdamW(params.values())
        runs.load_train_state(run_dir, params, {"w": torch.zeros(3)}, optimizer, dist=dist,
                              identity=dict(settings=dict(lr=0.001), inputs={}))
        print(f"rank {dist.rank} went on")
    runs.end_distributed(dist)


if __name__ == "__main__":  # tests/test_scale.py imports PROMPTS from here
    main()
