"""`--method llmcompressor`: llm-compressor's `oneshot` with the recipe, on the model loaded from the source folder."""

from adaq.errors import AdaqError
from adaq.quant.methods import MethodResult, QuantJob, register_method


def _calibration_dataset(job: QuantJob, tokenizer):
    from datasets import Dataset

    from adaq.quant.calibration import calibration_windows, load_texts

    spec = job.calibration
    windows = calibration_windows(tokenizer, load_texts(spec.path), spec.num_samples, spec.seq_len)
    dataset = Dataset.from_dict({"input_ids": windows.tolist()})
    return dict(dataset=dataset, num_calibration_samples=len(windows), max_seq_length=windows.shape[1])


@register_method("llmcompressor", "llm-compressor oneshot with the recipe (install adaq[quant])")
def quantize_llmcompressor(job: QuantJob) -> MethodResult:
    try:
        from llmcompressor import oneshot
    except ImportError:
        raise AdaqError("--method llmcompressor needs llm-compressor: pip install 'adaq[quant]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # adaq draws its own bars

    from adaq.formats.checkpoint import open_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(str(job.source))
    model = AutoModelForCausalLM.from_pretrained(str(job.source), dtype="auto", use_safetensors=True)
    recipe_file = job.out_dir / "recipe.input.yaml"
    recipe_file.write_text(job.recipe.to_yaml())
    extra = _calibration_dataset(job, tokenizer) if job.calibration is not None else {}
    task = job.progress.task("llm-compressor oneshot", None)
    oneshot(model=model, recipe=str(recipe_file), tokenizer=tokenizer, output_dir=str(job.out_dir), **extra)
    recipe_file.unlink()
    job.progress.advance(task)
    written = open_checkpoint(job.out_dir)
    ignore = written.config["quantization_config"].get("ignore", [])
    return MethodResult(quantized=written.quantized_prefixes(), kept=list(ignore))
