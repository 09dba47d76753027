"""Fuzz the CLI with broken checkpoints: mutate a tiny checkpoint (truncated shards, wrong shapes, NaN weights, bad
config fields, missing files, symlinks), run `adaq validate`, `adaq run` and `adaq quantize` on each mutant, and count

- tracebacks: "Traceback" anywhere in stderr (every failure must be one `error:` line);
- hangs: a command still running after --timeout seconds;
- data lost: a file of an input (the mutant itself, a sentinel inside it and one beside it) changed or gone.

Bounded in count (--max-cases) and time (--budget), CPU only, no network, seeded (--seed) for the combined
mutations. Usage (from the repository root):

    python scripts/fuzz_cli.py --budget 900 --json fuzz.json
"""

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
MEMORY_LIMIT = 6 << 30  # address space of each command: a runaway allocation fails instead of swapping the host
SENTINEL = "SENTINEL.txt"


# ---- the tiny checkpoints -----------------------------------------------------------------------------------------
def tiny_dense(folder: Path) -> Path:
    import torch
    from helpers.tiny_models import random_model
    from helpers.tiny_tokenizer import write_tokenizer

    random_model("qwen3", seed=1).to(torch.bfloat16).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def tiny_nvfp4(dense: Path, folder: Path) -> Path:
    from adaq.quant.pipeline import quantize_model

    quantize_model(str(dense), folder, device="cpu")
    return folder


# ---- mutations: each edits a copy of a checkpoint in place --------------------------------------------------------
class NotApplicable(Exception):
    """A mutation that cannot apply after an earlier one (e.g. editing a shard that is now a symlink)."""


def regular_file(path: Path) -> Path:
    # Never read through a symlink here: one to /dev/zero would fill this process's memory.
    if path.is_symlink() or not path.is_file():
        raise NotApplicable(path.name)
    return path


def edit_config(**changes):
    def mutate(folder: Path) -> None:
        try:
            config = json.loads(regular_file(folder / "config.json").read_text())
        except ValueError:
            raise NotApplicable("config.json") from None
        if not isinstance(config, dict):
            raise NotApplicable("config.json")
        for key, value in changes.items():
            if value is DELETE:
                config.pop(key, None)
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
    return mutate


DELETE = object()


def edit_tensors(edit):
    def mutate(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        shard = regular_file(folder / "model.safetensors")
        tensors = load_file(shard)
        edit(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})
    return mutate


def set_value(name_part: str, value: float):
    def edit(tensors):
        name = next(n for n in tensors if name_part in n)
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = value
    return edit_tensors(edit)


def reshape(name_part: str):
    def edit(tensors):
        name = next(n for n in tensors if name_part in n)
        tensors[name] = tensors[name][: tensors[name].shape[0] // 2].contiguous()
    return edit_tensors(edit)


def drop_tensor(name_part: str):
    def edit(tensors):
        del tensors[next(n for n in tensors if name_part in n)]
    return edit_tensors(edit)


def truncate(fraction: float):
    def mutate(folder: Path) -> None:
        shard = regular_file(folder / "model.safetensors")
        shard.write_bytes(shard.read_bytes()[: int(shard.stat().st_size * fraction)])
    return mutate


def header_length(value: int):
    def mutate(folder: Path) -> None:
        shard = regular_file(folder / "model.safetensors")
        data = bytearray(shard.read_bytes())
        data[:8] = value.to_bytes(8, "little")
        shard.write_bytes(bytes(data))
    return mutate


def garble_header(folder: Path) -> None:
    shard = regular_file(folder / "model.safetensors")
    data = bytearray(shard.read_bytes())
    data[8:40] = b"{not json at all!!" + b" " * 14
    shard.write_bytes(bytes(data))


def remove(name: str):
    def mutate(folder: Path) -> None:
        if not (folder / name).is_file():
            raise NotApplicable(name)
        (folder / name).unlink()
    return mutate


def write(name: str, content: bytes):
    def mutate(folder: Path) -> None:
        (folder / name).write_bytes(content)
    return mutate


def symlink(name: str, target: str):
    def mutate(folder: Path) -> None:
        path = folder / name
        path.unlink(missing_ok=True)
        path.symlink_to(target.format(folder=folder, parent=folder.parent))
    return mutate


def shard_index(weight_map: dict):
    return write("model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}).encode())


def pickle_only(folder: Path) -> None:
    regular_file(folder / "model.safetensors").rename(folder / "pytorch_model.bin")


MUTATIONS = {
    "truncated shard (half)": truncate(0.5),
    "truncated shard (4 bytes)": truncate(4 / 10**9),
    "empty shard": truncate(0),
    "header length 2^63": header_length(2**63),
    "header length past the end": header_length(10**7),
    "garbled header": garble_header,
    "q_proj wrong shape": reshape("layers.0.self_attn.q_proj.weight"),
    "down_proj wrong shape": reshape("layers.1.mlp.down_proj.weight"),
    "embed wrong shape": reshape("embed_tokens.weight"),
    "missing layer tensor": drop_tensor("layers.1.self_attn.o_proj.weight"),
    "NaN in a norm": set_value("layers.0.input_layernorm.weight", float("nan")),
    "inf in q_proj": set_value("layers.0.self_attn.q_proj.weight", float("inf")),
    "NaN in embeddings": set_value("embed_tokens.weight", float("nan")),
    "no config.json": remove("config.json"),
    "config not JSON": write("config.json", b"{ this is not json"),
    "config a list": write("config.json", b"[1, 2, 3]"),
    "config binary": write("config.json", bytes(range(256))),
    "unknown model_type": edit_config(model_type="llama9", architectures=["Llama9ForCausalLM"]),
    "no architectures": edit_config(architectures=DELETE),
    "num_hidden_layers 1000": edit_config(num_hidden_layers=1000),
    "num_hidden_layers 0": edit_config(num_hidden_layers=0),
    "num_hidden_layers -1": edit_config(num_hidden_layers=-1),
    "hidden_size a string": edit_config(hidden_size="64"),
    "num_attention_heads 0": edit_config(num_attention_heads=0),
    "num_key_value_heads 3": edit_config(num_key_value_heads=3),
    "head_dim 7": edit_config(head_dim=7),
    "vocab_size 0": edit_config(vocab_size=0),
    "vocab_size 10^12": edit_config(vocab_size=10**12),
    "max_position_embeddings 1e9": edit_config(max_position_embeddings=10**9),
    "max_position_embeddings 0": edit_config(max_position_embeddings=0),
    "max_position_embeddings -5": edit_config(max_position_embeddings=-5),
    "rope_theta a string": edit_config(rope_parameters={"rope_type": "default", "rope_theta": "big"}),
    "rms_norm_eps null": edit_config(rms_norm_eps=None),
    "no tokenizer.json": remove("tokenizer.json"),
    "tokenizer.json garbage": write("tokenizer.json", b"\x00\x01garbage"),
    "tokenizer_config garbage": write("tokenizer_config.json", b"{]"),
    "index maps to a missing shard": shard_index({"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}),
    "index not JSON": write("model.safetensors.index.json", b"nope"),
    "pickle only": pickle_only,
    "shard symlinked to /dev/zero": symlink("model.safetensors", "/dev/zero"),
    "shard symlinked to a folder": symlink("model.safetensors", "{parent}"),
    "shard symlink loop": symlink("model.safetensors", "model.safetensors"),
    "shard symlinked outside (sentinel)": symlink("model.safetensors", "{parent}/" + SENTINEL),
    "config symlinked to /dev/zero": symlink("config.json", "/dev/zero"),
    "config dangling symlink": symlink("config.json", "/nonexistent/config.json"),
}


def quantized_mutations() -> dict:
    """Mutations that only mean something for an NVFP4 checkpoint."""
    return {
        "NaN block scale": set_value("layers.0.self_attn.q_proj.weight_scale", float("nan")),
        "zero global scale": set_value("layers.0.mlp.up_proj.weight_global_scale", 0.0),
        "missing weight_scale": drop_tensor("layers.1.mlp.gate_proj.weight_scale"),
        "packed weight wrong shape": reshape("layers.0.self_attn.k_proj.weight_packed"),
        "quantization_config garbage": edit_config(quantization_config={"quant_method": "compressed-tensors",
                                                                        "config_groups": "??"}),
    }


# ---- running one case ---------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    case: str
    command: str
    exit_code: int | None
    seconds: float
    traceback: bool
    hang: bool
    hang_cpu_seconds: float | None  # CPU time of a command killed at the timeout: a spin, or a starved machine
    data_lost: list[str]
    first_error: str


def fingerprint(paths: list[Path]) -> dict[str, str]:
    """Content hashes of every file under the inputs (symlinks by their target name, never followed)."""
    prints = {}
    for root in paths:
        for path in [root, *root.rglob("*")] if root.is_dir() and not root.is_symlink() else [root]:
            if path.is_symlink():
                prints[str(path)] = "link:" + os.readlink(path)
            elif path.is_file():
                prints[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return prints


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_case(case: str, command: list[str], inputs: list[Path], timeout: float, cwd: Path) -> Outcome:
    before = fingerprint(inputs)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "ADAQ_CACHE": str(cwd / "cache"), "CUDA_VISIBLE_DEVICES": ""}
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "adaq", *command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, errors="replace", preexec_fn=limit_memory,
                               start_new_session=True)
    cpu = None
    try:
        _, err = process.communicate(timeout=timeout)
        hang = False
    except subprocess.TimeoutExpired:
        cpu = cpu_seconds(process.pid)
        os.killpg(process.pid, 9)
        _, err = process.communicate()
        hang = True
    after = fingerprint(inputs)
    lost = sorted(name for name in before if after.get(name) != before[name])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    return Outcome(case, " ".join(command), process.returncode, round(time.monotonic() - started, 1),
                   "Traceback" in err, hang, cpu, lost, (errors or [""])[0].replace(f"{cwd}/", "")[:200])


def commands_for(folder: Path, kind: str, work: Path, overlaps: bool) -> list[list[str]]:
    """The commands run on one mutant; with `overlaps`, also quantize writes that must be refused because OUT is,
    contains or lies inside the input (a symlink to it included)."""
    run = ["run", str(folder), "Hello", "--max-tokens", "2", "--backend", "reference", "--device", "cpu",
           "--temperature", "0"]
    commands = [["validate", str(folder)], run]
    quantize = ["quantize", str(folder), "--device", "cpu", "-o"]
    if kind == "dense":
        commands.append([*quantize, str(work / "out")])
    if overlaps:
        commands += [[*quantize, str(folder), "--force"], [*quantize, str(work), "--force"],
                     [*quantize, str(folder / "nested")], [*quantize, str(work / "link-to-ckpt"), "--force"],
                     [*quantize, str(work / SENTINEL), "--force"]]
    return commands


def prepare(base: Path, mutations: list, work: Path) -> Path:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / SENTINEL).write_text("beside the input")
    folder = work / "ckpt"
    shutil.copytree(base, folder)
    (folder / SENTINEL).write_text("inside the input")
    (work / "link-to-ckpt").symlink_to(folder)
    for mutate in mutations:
        mutate(folder)
    return folder


def plan_cases(bases: dict[str, Path], max_cases: int, seed: int) -> list[tuple[str, str, list, bool]]:
    """(name, base, mutations, overlaps): the intact checkpoints and a few mutants also get the overlapping outputs."""
    cases = [("intact", kind, [], True) for kind in bases]
    cases += [(name, "dense", [mutate], index % 8 == 0) for index, (name, mutate) in enumerate(MUTATIONS.items())]
    cases += [(name, "nvfp4", [mutate], False) for name, mutate in {**MUTATIONS, **quantized_mutations()}.items()]
    rng = random.Random(seed)
    names = list(MUTATIONS)
    while len(cases) < max_cases:  # pairs of mutations, for what one alone does not reach
        first, second = rng.sample(names, 2)
        kind = rng.choice(list(bases))
        cases.append((f"{first} + {second}", kind, [MUTATIONS[first], MUTATIONS[second]], False))
    return cases[:max_cases]


def fuzz(args) -> list[Outcome]:
    scratch = Path(tempfile.mkdtemp(prefix="adaq-fuzz-"))
    try:
        dense = tiny_dense(scratch / "base-dense")
        bases = {"dense": dense, "nvfp4": tiny_nvfp4(dense, scratch / "base-nvfp4")}
        cases = plan_cases(bases, args.max_cases, args.seed)
        deadline = time.monotonic() + args.budget
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(fuzz_case, index, case, bases, scratch, args, deadline)
                       for index, case in enumerate(cases)]
            return [outcome for future in futures for outcome in future.result()]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def fuzz_case(index: int, case, bases: dict[str, Path], scratch: Path, args, deadline: float) -> list[Outcome]:
    name, kind, mutations, overlaps = case
    outcomes = []
    for position in range(len(commands_for(Path(), kind, Path(), overlaps))):
        if time.monotonic() > deadline:
            break
        work = scratch / f"case-{index}-{position}"
        try:
            folder = prepare(bases[kind], mutations, work)
        except (NotApplicable, RuntimeError, StopIteration) as skipped:
            print(f"skip: {kind}: {name} (the mutations clash on {skipped})", flush=True)
            shutil.rmtree(work, ignore_errors=True)
            return outcomes
        command = commands_for(folder, kind, work, overlaps)[position]
        outcome = run_case(f"{kind}: {name}", command, [work], args.timeout, work)
        report_line(outcome)
        outcomes.append(outcome)
        shutil.rmtree(work, ignore_errors=True)
    return outcomes


def report_line(outcome: Outcome) -> None:
    flags = "".join(flag for flag, on in (("T", outcome.traceback), ("H", outcome.hang), ("L", outcome.data_lost))
                    if on) or "-"
    command = outcome.command.split()[0]
    print(f"{flags:3} exit {str(outcome.exit_code):>4} {outcome.seconds:5.1f}s {command:9} {outcome.case:45} "
          f"{outcome.first_error[:90]}", flush=True)


def summary(outcomes: list[Outcome]) -> dict:
    by_command: dict[str, dict] = {}
    for outcome in outcomes:
        command = outcome.command.split()[0]
        counts = by_command.setdefault(command, {"runs": 0, "exit_0": 0, "exit_0_on_a_mutant": 0, "clean_errors": 0})
        counts["runs"] += 1
        counts["exit_0"] += outcome.exit_code == 0
        counts["exit_0_on_a_mutant"] += outcome.exit_code == 0 and not outcome.case.endswith(": intact")
        counts["clean_errors"] += outcome.exit_code not in (0, None) and not outcome.traceback and not outcome.hang
    return {"runs": len(outcomes), "tracebacks": sum(o.traceback for o in outcomes),
            "hangs": sum(o.hang for o in outcomes), "data_lost": sum(bool(o.data_lost) for o in outcomes),
            "by_command": by_command}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-cases", type=int, default=110, help="mutants (each runs 2-8 commands)")
    parser.add_argument("--budget", type=float, default=1800, help="seconds for the whole run (no new command after)")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds before a command counts as a hang (a busy machine needs many)")
    parser.add_argument("--jobs", type=int, default=2, help="commands run at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write every outcome and the counts here")
    args = parser.parse_args()
    outcomes = fuzz(args)
    counts = summary(outcomes)
    print(json.dumps(counts))
    if args.json:
        args.json.write_text(json.dumps({"counts": counts, "outcomes": [asdict(o) for o in outcomes]}, indent=2))
    sys.exit(1 if counts["tracebacks"] or counts["hangs"] or counts["data_lost"] else 0)


if __name__ == "__main__":
    main()
