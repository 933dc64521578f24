"""Where the training-free conversion's error comes from (CPU): RoRoPE alone (DeepSeek's latent RMSNorm taken out of
the converted model), the latent RMSNorm with partial whitening, and with norm stabilisers.

    python benchmarks/conversion_ablation.py 512,64,0.5 512,64,0.5,nonorm 512,64,0,stab=64 256,64,0,stab=32

Each argument is ``kv_lora_rank,qk_rope_head_dim,whitening[,nonorm][,stab=N]``. The origin is the bundled
SmolLM2-135M-Instruct GGUF as transformers dequantises it; the converted model is transformers' DeepseekV3, so
nothing of this project's model code is in the measurement. Calibration: 24 x 512 tokens of the offline corpus's
train split; held-out: 4 x 512 tokens of its held-out split. Prints held-out perplexity and KL(origin || converted).
"""

import math
import sys
import time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from mla_components.conversion import default_gguf_path, load_gguf_with_transformers
from mla_components.conversion.gqa_to_mla import LayerCalibration, convert_llama_to_mla
from mla_components.data import corpus_texts

SEQ = 512


def main(specs: list[str]) -> None:
    torch.manual_seed(0)
    origin, tokenizer = load_gguf_with_transformers(default_gguf_path())
    held = tokenizer("\n\n".join(corpus_texts("heldout")), return_tensors="pt").input_ids[0][: 4 * SEQ].view(4, SEQ)
    stream = tokenizer("\n\n".join(corpus_texts("train")[:40]), return_tensors="pt").input_ids[0]
    layers = origin.config.num_hidden_layers
    moments = [0.0] * layers
    samples: list[list[torch.Tensor]] = [[] for _ in range(layers)]

    def hook(i):
        def collect(module, args, out):
            x = out.reshape(-1, out.shape[-1])
            moments[i] = moments[i] + x.double().T @ x.double()
            samples[i].append(x[torch.randperm(x.shape[0])[:128]].float())

        return collect

    handles = [layer.input_layernorm.register_forward_hook(hook(i)) for i, layer in enumerate(origin.model.layers)]
    with torch.no_grad():
        for c in range(24):
            origin(stream[c * SEQ : (c + 1) * SEQ][None])
        reference = torch.log_softmax(origin(held).logits[:, :-1].float(), -1)
    for handle in handles:
        handle.remove()
    calibration = [LayerCalibration(m / (24 * SEQ), torch.cat(s)) for m, s in zip(moments, samples, strict=True)]
    target = held[:, 1:, None]
    print(f"origin perplexity {math.exp(-reference.gather(-1, target).mean().item()):.3f}")
    for spec in specs:
        rank, rope, whitening, *flags = spec.split(",")
        options = dict(f.split("=") for f in flags if "=" in f)
        started = time.perf_counter()
        result = convert_llama_to_mla(
            origin.config.to_dict(),
            origin.state_dict(),
            calibration,
            kv_lora_rank=int(rank),
            qk_rope_head_dim=int(rope),
            whitening=float(whitening),
            stabilizer_dims=int(options.get("stab", 0)),
        )
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**result.config.to_hf_config())).eval()
        model.load_state_dict(result.hf_state_dict, strict=False)
        if "nonorm" in flags:
            for layer in model.model.layers:
                layer.self_attn.kv_a_layernorm = torch.nn.Identity()
        with torch.no_grad():
            log_q = torch.log_softmax(model(held).logits[:, :-1].float(), -1)
        kl = (reference.exp() * (reference - log_q)).sum(-1).mean().item()
        perplexity = math.exp(-log_q.gather(-1, target).mean().item())
        summary = result.summary()
        print(
            f"{spec:24s} perplexity {perplexity:8.3f}  KL {kl:.4f}  latent RMS CV {summary['mean_latent_rms_cv']:.4f}  "
            f"k_pe energy {summary['mean_rope_key_energy']:.3f}  ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
