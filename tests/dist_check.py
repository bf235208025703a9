"""One check of the distributed plumbing, run under torchrun (gloo, CPU) by tests/test_scale.py.

  python -m torch.distributed.run --nproc_per_node 2 tests/dist_check.py encode <pipeline> <cache> <out>
  python -m torch.distributed.run --nproc_per_node 2 tests/dist_check.py resume <folder of per-rank run dirs>
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import runs  # noqa: E402
import worlds  # noqa: E402

PROMPTS = [f"a prompt with the number {i}" for i in range(50)]


def main():
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
    runs.end_distributed(dist)


if __name__ == "__main__":  # tests/test_scale.py imports PROMPTS from here
    main()
