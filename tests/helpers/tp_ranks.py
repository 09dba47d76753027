"""One spawned group of 4 gloo ranks that runs every tiny model at tensor-parallel sizes 1, 2 and 4.

Rank 0 runs TP=1 alone, ranks 0-1 run TP=2 in a sub-group, all four run TP=4; each run is the same scenario (two
sequences of different lengths prefilled in chunks, then 32 greedy decode steps through a paged fp32 KV cache),
and rank 0 saves every run's logits and tokens for the test to compare. One spawn for every model keeps the cost
of starting processes (importing torch and transformers four times) paid once.
"""

from datetime import timedelta
from pathlib import Path

import torch

PROMPTS = [[11, 200, 37, 5, 90, 14, 3, 250, 66, 41, 8], [7, 123, 45, 199, 2]]
DECODE_STEPS = 32


def scenario(model) -> dict:
    from helpers.paged import PagedRunner

    runner = PagedRunner(model, len(PROMPTS), max(map(len, PROMPTS)) + DECODE_STEPS + 1)
    first = runner.step({0: PROMPTS[0][:6], 1: PROMPTS[1]})  # a chunk of sequence 0 beside all of sequence 1
    prefill = torch.stack([runner.step({0: PROMPTS[0][6:]})[0], first[1]])
    logits, tokens = [prefill], [prefill.argmax(-1)]
    for _ in range(DECODE_STEPS):
        step = runner.step({0: [int(tokens[-1][0])], 1: [int(tokens[-1][1])]})
        logits.append(step)
        tokens.append(step.argmax(-1))
    return {"logits": torch.stack(logits), "tokens": torch.stack(tokens)}


def run_model(folder: Path, tp) -> dict:
    from adaq.backends import get_backend
    from adaq.formats.checkpoint import open_checkpoint
    from adaq.models import build_model, load_weights

    checkpoint = open_checkpoint(folder)
    backend = get_backend("reference", "cpu", tp=tp)
    model = load_weights(build_model(checkpoint.config, backend, torch.float32), checkpoint)
    with torch.inference_mode():
        return scenario(model)


def rank_main(rank: int, world: int, port: int, folders: dict[str, str], out: str) -> None:
    import torch.distributed as dist

    from adaq.backends.parallel import SINGLE, TPGroup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                           timeout=timedelta(seconds=120))
    pair = dist.new_group([0, 1])
    results = {}
    for arch, folder in folders.items():
        if rank == 0:
            results[(arch, 1)] = run_model(Path(folder), SINGLE)
        if rank < 2:
            results[(arch, 2)] = run_model(Path(folder), TPGroup(rank, 2, pair))
        results[(arch, 4)] = run_model(Path(folder), TPGroup(rank, 4, dist.group.WORLD))
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
