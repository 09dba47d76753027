"""Engine workloads the CPU engine tests share."""

import itertools


def run_with_staggered_arrivals(engine, target: list[int], params_for, after_step=None) -> tuple[int, dict]:
    """`target` among 7 other prompts (5 to 23 tokens) that arrive one per engine step, run to the end:
    (target's request id, final output per request id). params_for(n): the sampling params of n new tokens;
    after_step(engine): checked after every step."""
    others = [[(7 * i + j) % 240 + 1 for j in range(5 + 3 * i)] for i in range(7)]
    engine.add_request(others[0], params_for(30))
    target_id = engine.add_request(target, params_for(24))
    finished = {}
    for step in itertools.count():
        if step + 1 < len(others):
            engine.add_request(others[step + 1], params_for(20 + step))
        for output in engine.step():
            finished[output.request_id] = output
        if after_step is not None:
            after_step(engine)
        if not engine.has_unfinished():
            return target_id, finished
